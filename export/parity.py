"""ONNX Runtime against PyTorch on the same sample inputs, right after export.

This is the export stage's own guard (a tight float tolerance on synthetic inputs at several shapes);
the accuracy gate on real data against labels is validation/'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from miaotui.config import Config
from miaotui.errors import CheckFailed, InputError

FLOAT32_ATOL = 1e-4


@dataclass(frozen=True)
class ParityResult:
    sizes: dict[str, int]  # the dims' sizes of this check
    max_abs_diff: dict[str, float]  # per output
    atol: float

    @property
    def passed(self) -> bool:
        return all(diff <= self.atol for diff in self.max_abs_diff.values())

    def shape_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.sizes.items()) or "static"


def parity_sizes(config: Config) -> list[dict[str, int]]:
    """Two sets of dim sizes inside the ranges: opt, and an uneven one elsewhere in the range."""
    first = config.sizes("opt")
    second = {}
    for name, dim in config.dims.items():
        size = dim.min + (dim.max - dim.min) // 3 + 1 if not dim.is_static else dim.min
        size = min(size, dim.max)
        if size == dim.opt and not dim.is_static:
            size = dim.min if dim.min != dim.opt else dim.max
        second[name] = size
    return [first] if second == first else [first, second]


def torch_outputs(model, feed: dict[str, np.ndarray], output_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    import torch

    with torch.inference_mode():
        result = model(**{k: torch.from_numpy(v) for k, v in feed.items()})
    if isinstance(result, dict):
        values = list(result.values())
    elif isinstance(result, (tuple, list)):
        values = list(result)
    else:
        values = [result]
    return {name: value.detach().cpu().numpy() for name, value in zip(output_names, values)}


def onnxruntime_session(onnx_path: Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def exposing_session(model, tensors: list[str]):
    """An unoptimized CPU session of `model` (left as it was) that also returns `tensors`, intermediate
    ones included: optimizations off, so every tensor is computed as the graph says."""
    import onnx
    import onnxruntime as ort

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    present = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(onnx.ValueInfoProto(name=name) for name in tensors if name not in present)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_session(session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An ONNX Runtime session's outputs by name."""
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def max_abs_diff(reference: np.ndarray, actual: np.ndarray, name: str) -> float:
    if reference.shape != actual.shape:
        raise CheckFailed(f"output {name}: PyTorch gives shape {reference.shape}, ONNX Runtime {actual.shape}")
    if reference.size == 0:
        return 0.0
    if np.issubdtype(reference.dtype, np.floating):
        ref, act = reference.astype(np.float64), actual.astype(np.float64)
        if not (np.isfinite(ref) == np.isfinite(act)).all():
            return float("inf")
        finite = np.isfinite(ref)
        return float(np.abs(ref[finite] - act[finite]).max()) if finite.any() else 0.0
    return float(np.abs(reference.astype(np.int64) - actual.astype(np.int64)).max())


def check_parity(
    model,
    config: Config,
    onnx_path: Path,
    sizes_list: list[dict[str, int]] | None = None,
    atol: float = FLOAT32_ATOL,
    seed: int = 0,
) -> list[ParityResult]:
    """Run both on sample inputs at each set of sizes; raise CheckFailed naming the first miss."""
    from miaotui.data.samples import sample_inputs

    session = onnxruntime_session(onnx_path)
    results = []
    for index, sizes in enumerate(sizes_list or parity_sizes(config)):
        for name, size in sizes.items():
            dim = config.dims[name]
            if not dim.min <= size <= dim.max:
                raise InputError(f"parity size {name}={size} is outside [dims] {name} ({dim.min}..{dim.max})")
        feed = sample_inputs(config, sizes, seed=seed + index)
        expected = torch_outputs(model, feed, config.model.outputs)
        actual = run_session(session, feed)
        diffs = {name: max_abs_diff(expected[name], actual[name], name) for name in config.model.outputs}
        result = ParityResult(sizes, diffs, atol)
        results.append(result)
        if not result.passed:
            worst = max(diffs, key=diffs.get)
            raise CheckFailed(
                f"{config.name}: ONNX Runtime differs from PyTorch at {result.shape_text()}: output {worst} "
                f"max |diff| {diffs[worst]:.3g} > {atol:g}"
            )
    return results
