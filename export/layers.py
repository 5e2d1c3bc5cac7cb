"""Layer-wise divergence of an INT8 graph from its FP32 graph: where the INT8 model starts to drift.

Both graphs run side by side on the same samples with every intermediate tensor they share exposed
(the quantizer keeps the names of the tensors it does not replace), and each tensor's
signal-to-quantization-noise ratio is accumulated over the samples:
SQNR = 10 log10(sum(fp32^2) / sum((fp32 - int8)^2)) dB, over real positions only where the model
has a padding mask (padded positions never reach the logits but hold most of the noise). Unlike the
search's sensitivity (one node's own noise), this is the drift accumulated up to that point, in
graph order. Polygraphy's
`run --validate --onnx-outputs mark all` compares the same way but does not reduce to one number a layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SKIPPED_OP_TYPES = ("QuantizeLinear", "DequantizeLinear", "Shape", "Constant", "Cast", "Range", "Unsqueeze",
                    "Squeeze", "Concat", "Reshape", "Transpose", "Equal", "Not", "Where", "Expand",
                    "ConstantOfShape", "Slice")


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10 log10(signal / noise), to 3 decimals; inf when there is no noise."""
    return round(float(10 * np.log10(signal_power / noise_power)), 3) if noise_power > 0 else float("inf")


@dataclass
class LayerDivergence:
    index: int  # position in the INT8 graph's node order
    node: str
    op_type: str
    tensor: str
    int8: bool  # the node reads a dequantized input (it computes in INT8)
    sqnr_db: float


def _float_outputs(model) -> dict[str, tuple[int, object]]:
    """tensor -> (node index, node) for the float outputs of compute nodes."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {v.name for v in list(inferred.graph.value_info) + list(inferred.graph.output)
              if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    return {node.output[0]: (index, node) for index, node in enumerate(model.graph.node)
            if node.op_type not in SKIPPED_OP_TYPES and node.output and node.output[0] in floats}


def layer_divergence(fp32_path: Path, int8_path: Path, batches: Iterable[dict[str, np.ndarray]],
                     mask_input: str | None = None) -> list[LayerDivergence]:
    import onnx

    from miaotui.data.datasets import without_labels
    from miaotui.export.node_errors import real_positions
    from miaotui.export.parity import exposing_session

    fp32, int8 = onnx.load(str(fp32_path)), onnx.load(str(int8_path))
    shared = _float_outputs(int8)
    reference = _float_outputs(fp32)
    tensors = [t for t in shared if t in reference]
    dequantized = {n.output[0] for n in int8.graph.node if n.op_type == "DequantizeLinear"}

    sessions = exposing_session(fp32, tensors), exposing_session(int8, tensors)
    signal = dict.fromkeys(tensors, 0.0)
    noise = dict.fromkeys(tensors, 0.0)
    for feed in batches:
        feed = without_labels(feed)
        mask = feed.get(mask_input) if mask_input else None
        expected, actual = (dict(zip(tensors, s.run(tensors, feed))) for s in sessions)
        for name in tensors:
            e = real_positions(expected[name].astype(np.float64), mask)
            signal[name] += float(np.sum(e**2))
            noise[name] += float(np.sum((e - real_positions(actual[name].astype(np.float64), mask)) ** 2))
    rows = []
    for name in tensors:
        index, node = shared[name]
        rows.append(LayerDivergence(index, node.name, node.op_type, name, any(i in dequantized for i in node.input),
                                    sqnr_db(signal[name], noise[name])))
    return sorted(rows, key=lambda r: r.index)


def plot_layers(rows: list[LayerDivergence], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from miaotui.artifacts import atomic_path

    finite = [r for r in rows if np.isfinite(r.sqnr_db)]
    figure, axes = plt.subplots(figsize=(max(8, len(rows) / 12), 4.5))
    axes.plot([r.index for r in finite], [r.sqnr_db for r in finite], color="tab:blue", linewidth=1, label="SQNR")
    int8 = [r for r in finite if r.int8]
    axes.scatter([r.index for r in int8], [r.sqnr_db for r in int8], color="tab:red", s=12, zorder=3,
                 label="INT8 node")
    axes.set_xlabel("node position in the INT8 graph")
    axes.set_ylabel("SQNR vs FP32 (dB, higher is closer)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as staged:
        figure.savefig(staged, format="png", dpi=110)
    plt.close(figure)


@dataclass
class LayersReport:
    int8: Path
    reference: Path  # the FP32 graph
    samples: int
    data_where: str
    rows: list[LayerDivergence]
    written: list[Path]  # layers.json, layers.png

    @property
    def worst(self) -> LayerDivergence | None:
        return min(self.rows, key=lambda r: r.sqnr_db) if self.rows else None


def inspect_layers(path: Path, config_or_model: str | None, reference: Path | None, samples: int,
                   report_dir: Path | None, progress=None) -> LayersReport:
    """Run an INT8 graph and its FP32 graph (model.opt.onnx beside it) on `samples` samples spread over
    the validation set (else the calibration set); write layers.json and layers.png (default: reports/
    of the work dir the graph is in)."""
    from miaotui.artifacts import atomic_write_json
    from miaotui.data.datasets import data_set, rebatch, spread_rows
    from miaotui.errors import InputError
    from miaotui.export.inspect_onnx import summarize_onnx
    from miaotui.models import resolve_config
    from miaotui.workdir import LAYERS_PLOT, LAYERS_REPORT, WorkDir

    if path.suffix != ".onnx":
        raise InputError(f"{path}: --layers compares an INT8 .onnx graph with its FP32 graph")
    summary = summarize_onnx(path)
    if not summary.precision.startswith("int8"):
        raise InputError(f"{path}: holds a {summary.precision} graph; --layers needs an INT8 one (model.int8.onnx)")
    work = WorkDir(path.parent)
    reference = reference or work.optimized
    if not reference.is_file():
        raise InputError(f"{reference}: the FP32 graph is missing; give --reference FP32.onnx")
    if config_or_model is None and not work.has_config():
        raise InputError(f"{path}: no {work.config.name} beside it; give --config CONFIG|MODEL (for its data)")
    config = resolve_config(config_or_model or work.config)
    data = data_set(config, "validation" if config.data.validation else "calibration")
    rows = spread_rows(data, samples)
    if progress is not None:
        progress(f"run {path.name} and {reference.name} on {samples} samples")
    result = layer_divergence(reference, path, rebatch(rows, 8), config.padding_mask)
    folder = report_dir or work.reports_dir
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / LAYERS_REPORT, folder / LAYERS_PLOT]
    atomic_write_json(written[0], {"int8": str(path), "fp32": str(reference), "samples": samples,
                                   "set": data.where, "layers": [r.__dict__ for r in result]})
    plot_layers(result, written[1], f"{path.name} vs {reference.name}: SQNR per layer ({samples} samples)")
    return LayersReport(path, reference, samples, data.where, result, written)
