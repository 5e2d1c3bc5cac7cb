"""Synthetic sample inputs drawn from a config's input specs: dtypes, shapes and value ranges."""

from __future__ import annotations

import numpy as np

from miaotui.config import FLOAT_DTYPES, Config


def sample_inputs(config: Config, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """One feed dict with each named dim at `sizes`; the same seed gives the same arrays."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name, spec in config.inputs.items():
        shape = config.shape_at(name, sizes)
        if spec.dtype == "bool":
            feed[name] = rng.random(shape) < 0.5
        elif spec.dtype in FLOAT_DTYPES:
            low, high = spec.range
            feed[name] = rng.uniform(low, high, shape).astype(spec.dtype)
        else:
            low, high = spec.range
            feed[name] = rng.integers(int(low), int(high), shape, dtype=spec.dtype)
    return feed


def trace_sizes(config: Config) -> dict[str, int]:
    """The sizes the model is traced at: opt, but never 1 for a dynamic dim, since torch.export
    specializes sizes 0 and 1 into constants."""
    sizes = {}
    for name, dim in config.dims.items():
        size = dim.opt
        if not dim.is_static and size == 1:
            size = min(2, dim.max)
        sizes[name] = size
    return sizes
