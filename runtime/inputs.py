"""Inputs checked before they reach a backend, and batches split to what an engine takes.

A backend given a wrong dtype or shape may crash the process (TensorRT) or answer silently wrong
(a float mask read as int bits); so every feed is checked against the sidecar's ranges first, and
each mistake names the tensor, what it got and what the engine accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from miaotui.engines.backend import is_torch
from miaotui.engines.metadata import TensorRange, batch_axis_shared
from miaotui.errors import InputError


@dataclass(frozen=True)
class Feed:
    arrays: dict[str, object]  # contiguous numpy arrays, or torch tensors (left on their device)
    batch: int  # rows along axis 0
    torch_device: str | None  # the device of torch inputs ("cpu", "cuda:0"); None for numpy


def _dtype_name(value) -> str:
    return str(value.dtype).removeprefix("torch.")


def to_feed(inputs: list[TensorRange], given: Mapping[str, object]) -> Feed:
    """Check names, dtypes, ranks and dims (axis 0 may exceed the engine's max: it is split later)."""
    names = [t.name for t in inputs]
    unknown = [name for name in given if name not in names]
    if unknown:
        raise InputError(f"unknown input '{unknown[0]}': the engine takes {', '.join(names)}")
    missing = [name for name in names if name not in given]
    if missing:
        raise InputError(f"missing input '{missing[0]}': the engine takes {', '.join(names)}")
    devices = {str(v.device) for v in given.values() if is_torch(v)}
    if devices and len(devices) + sum(not is_torch(v) for v in given.values()) > 1:
        raise InputError("inputs mix torch tensors on " + ", ".join(sorted(devices)) + " with other arrays: pass one kind")
    splittable = batch_axis_shared(inputs)
    arrays, batches = {}, set()
    for spec in inputs:
        value = given[spec.name]
        if not isinstance(value, np.ndarray) and not is_torch(value):
            raise InputError(f"input '{spec.name}': got {type(value).__name__}, expected a numpy array or torch tensor "
                             f"of {spec.dtype}")
        if _dtype_name(value) != spec.dtype:
            raise InputError(f"input '{spec.name}': dtype {_dtype_name(value)}, the engine takes {spec.dtype}")
        if value.ndim != len(spec.min):
            raise InputError(f"input '{spec.name}': shape {list(value.shape)} has rank {value.ndim}, the engine takes "
                             f"rank {len(spec.min)} ({spec.range_text()})")
        if value.ndim and value.shape[0] == 0:
            raise InputError(f"input '{spec.name}': empty batch (shape {list(value.shape)}); the engine takes "
                             f"{spec.range_text()}")
        for axis, (size, low, high) in enumerate(zip(value.shape, spec.min, spec.max)):
            if axis == 0 and splittable and size > high:
                continue  # split into batches of at most `high` rows
            if not low <= size <= high:
                raise InputError(f"input '{spec.name}': shape {list(value.shape)}, dim {axis} is {size}, the engine "
                                 f"takes {low}..{high} there ({spec.range_text()})")
        if spec.values is not None and np.dtype(spec.dtype).kind in "iu":
            _check_values(spec, value)
        batches.add(value.shape[0] if value.ndim else 1)
        arrays[spec.name] = value.detach().contiguous() if is_torch(value) else np.ascontiguousarray(value)
    if splittable and len(batches) > 1:
        raise InputError(f"inputs disagree on the batch size: {', '.join(f'{n} {a.shape[0]}' for n, a in arrays.items())}")
    return Feed(arrays, batches.pop() if batches else 1, next(iter(devices)) if devices else None)


def _check_values(spec: TensorRange, value) -> None:
    """Integer inputs (token ids) inside the model's [low, high): an id past the vocabulary would index
    outside the embedding table (a raw backend error, or on some backends another row's answer)."""
    low, high = spec.values
    outside = (value < low) | (value >= high)  # numpy or torch alike, on the tensor's own device
    if bool(outside.any()):
        where = tuple(int(i) for i in (outside.nonzero()[0] if is_torch(value) else np.argwhere(outside)[0]))
        raise InputError(f"input '{spec.name}': value {value[where].item()} at {list(where)} is outside "
                         f"[{low:g}, {high:g}), the values the model takes (its config's [inputs] range)")
