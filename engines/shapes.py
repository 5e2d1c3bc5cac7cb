"""Shape ranges for an engine's inputs (TensorRT optimization profiles; the runtime's input checks).

From --shapes NAME:MIN,OPT,MAX (each like 8x128) where given, else from the config's [dims], and
checked against the ONNX graph before any builder runs: every name is a model input, ranks agree,
fixed dims stay fixed, min <= opt <= max, a dim shared by several inputs has one range, and a range
stays inside what the model was exported and checked for (the config's [dims]).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from miaotui.config import Config
from miaotui.engines.metadata import TensorRange
from miaotui.errors import InputError, first_line

_SHAPE = re.compile(r"^\d+(x\d+)*$")


def parse_shapes(specs: Sequence[str]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """"input_ids:1x1,8x128,64x256" -> {"input_ids": ((1, 1), (8, 128), (64, 256))}."""
    parsed = {}
    for spec in specs:
        name, sep, shapes = spec.rpartition(":")
        parts = shapes.split(",")
        if not sep or not name or len(parts) != 3 or not all(_SHAPE.match(p.strip()) for p in parts):
            raise InputError(f"--shapes {spec!r}: expected NAME:MIN,OPT,MAX with shapes like 1x16,8x128,32x256")
        if name in parsed:
            raise InputError(f"--shapes {spec!r}: input '{name}' is given twice")
        parsed[name] = tuple(tuple(int(n) for n in p.strip().split("x")) for p in parts)
    return parsed


def _text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def resolve_shapes(onnx_inputs, config: Config | None, overrides: Sequence[str] = ()) -> list[TensorRange]:
    """One TensorRange per ONNX input. `onnx_inputs` are export.inspect_onnx TensorInfos."""
    given = parse_shapes(overrides)
    names = [t.name for t in onnx_inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InputError(f"--shapes names input '{unknown[0]}', which the model does not have (its inputs: {', '.join(names)})")
    ranges = []
    for tensor in onnx_inputs:
        dims = tuple(tensor.shape)
        spec = config.inputs.get(tensor.name) if config else None
        if tensor.name in given:
            low, mid, high = given[tensor.name]
            source = "--shapes"
        elif spec is not None:
            low, mid, high = (config.shape_at(tensor.name, config.sizes(which)) for which in ("min", "opt", "max"))
            source = f"{config.path} [dims]"
        elif all(isinstance(d, int) and d > 0 for d in dims):
            low = mid = high = tuple(dims)
            source = "the model"
        else:
            raise InputError(f"input '{tensor.name}' has dynamic dims {list(dims)}: give --shapes {tensor.name}:MIN,OPT,MAX "
                             "or --config CONFIG")
        where = f"{source}: input '{tensor.name}'"
        if not len(low) == len(mid) == len(high) == len(dims):
            raise InputError(f"{where} has rank {len(low)}, the model's input has rank {len(dims)} {list(dims)}")
        for axis, (lo, op, hi, dim) in enumerate(zip(low, mid, high, dims)):
            if lo < 1:
                raise InputError(f"{where} dim {axis}: min {lo}, expected at least 1 (engines take no empty tensors)")
            if not lo <= op <= hi:
                raise InputError(f"{where} dim {axis}: expected min <= opt <= max, got {lo}, {op}, {hi}")
            if isinstance(dim, int) and dim > 0 and not lo == op == hi == dim:
                raise InputError(f"{where} dim {axis} is fixed at {dim} in the model, got {lo}, {op}, {hi}")
            if config is not None and spec is not None and isinstance(spec.shape[axis], str):
                bounds = config.dims[spec.shape[axis]]
                if lo < bounds.min or hi > bounds.max:
                    raise InputError(f"{where} dim {axis} ('{spec.shape[axis]}'): {lo}..{hi} is outside what the model "
                                     f"was exported and checked for, {bounds.min}..{bounds.max} ({config.path} [dims])")
        values = tuple(spec.range) if spec is not None and spec.range is not None else None
        ranges.append(TensorRange(tensor.name, tensor.dtype, dims, tuple(low), tuple(mid), tuple(high), values))
    _check_shared_dims(ranges)
    return ranges


def _check_shared_dims(ranges: list[TensorRange]) -> None:
    """A symbolic dim (batch, seq) shared by several inputs must get one range everywhere."""
    seen: dict[str, tuple[str, tuple[int, int, int]]] = {}
    for tensor in ranges:
        for axis, dim in enumerate(tensor.dims):
            if not isinstance(dim, str) or not dim:
                continue
            values = (tensor.min[axis], tensor.opt[axis], tensor.max[axis])
            if dim in seen and seen[dim][1] != values:
                other, theirs = seen[dim]
                raise InputError(f"dim '{dim}' is {'/'.join(map(str, values))} (min/opt/max) for input '{tensor.name}' "
                                 f"but {'/'.join(map(str, theirs))} for input '{other}': the model needs one range")
            seen.setdefault(dim, (tensor.name, values))


def shapes_text(ranges: list[TensorRange]) -> str:
    return "; ".join(f"{t.name} {_text(t.min)},{_text(t.opt)},{_text(t.max)}" for t in ranges)


def synthetic_feed(ranges: list[TensorRange], which: str, config: Config | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs at the min/opt/max shapes: values from the config's [inputs] range where it has one,
    else ones for integers (a valid id and an all-ones mask) and normal noise for floats."""
    rng = np.random.default_rng(seed)
    feed = {}
    for tensor in ranges:
        shape = getattr(tensor, which)
        spec = config.inputs.get(tensor.name) if config else None
        dtype = np.dtype(tensor.dtype)
        if spec is not None and spec.range is not None and dtype.kind in "iu":
            feed[tensor.name] = rng.integers(int(spec.range[0]), int(spec.range[1]), shape).astype(dtype)
        elif spec is not None and spec.range is not None and dtype.kind == "f":
            feed[tensor.name] = rng.uniform(spec.range[0], spec.range[1], shape).astype(dtype)
        elif dtype.kind == "b":
            feed[tensor.name] = np.ones(shape, dtype)
        elif dtype.kind in "iu":
            feed[tensor.name] = np.ones(shape, dtype)
        else:
            feed[tensor.name] = rng.standard_normal(shape).astype(dtype)
    mask = config.padding_mask if config is not None else None
    if mask is None and "attention_mask" in feed and "input_ids" in feed:
        mask = "attention_mask"
    if mask in feed:
        # Every position real, whatever the mask input is called: a random mask blanks whole rows, and
        # a torch TransformerEncoder then times other work than an engine does (its nested-tensor
        # path skips the padded half: 22 ms against 30 ms at batch 32 on one idle run here).
        feed[mask][...] = 1
    return feed


def max_diff(expected: np.ndarray, actual: np.ndarray) -> float:
    """Largest |difference|; NaN where both are NaN is the same answer (the parity gate judges NaNs)."""
    diff = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
    diff[np.isnan(expected) & np.isnan(actual)] = 0.0
    return float(np.max(diff, initial=0.0)) if not np.isnan(diff).any() else float("nan")


def run_at_extremes(run, ranges: list[TensorRange], config: Config | None, where: str, engine: str) -> None:
    """`run(feed)` at the min and max shapes of every range: a model that fails there is refused in one line."""
    for which in ("min", "max"):
        feed = synthetic_feed(ranges, which, config)
        try:
            run(feed)
        except Exception as error:
            shape = "; ".join(f"{name} {list(value.shape)}" for name, value in feed.items())
            raise InputError(f"{where}: {engine} fails at the {which} shapes ({shape}): {first_line(error)}; "
                             "narrow the shape ranges") from None
