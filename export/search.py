"""Accuracy-budgeted mixed precision: which nodes to keep in float so INT8 meets a top-1 agreement target.

1. Every searchable node (weight-carrying MatMul/Gemm/Gather, including those the rules keep in
   float) is quantized at once, with ONNX Runtime's quantizer and the calibrated ranges.
2. Sensitivity, one FP32 pass: each node's own quantization noise, with everything before it in
   FP32. Its FP32 input is quantized with the scale the INT8 graph holds, its weights are the INT8
   graph's dequantized weights, and the node's output is compared with the FP32 output
   (signal-to-quantization-noise ratio, SQNR, in dB). numpy evaluates the node: ONNX Runtime cannot
   run one node of a graph on another graph's intermediate tensors.
3. Ranking: lowest SQNR first; between nodes of about the same SQNR (half a dB), the one cheaper to
   keep in float (fewer multiply-accumulates) first. (Ranking by noise per unit of cost was tried on
   MiniLM: it put the cheap attention projections before the much noisier FFN down-projections and
   the search kept 31 of 39 nodes in float.)
4. Search: the agreement with FP32 of "the first k ranked nodes in float, the rest INT8", measured end
   to end on held-out calibration samples (never the validation split the gate uses), bisected for
   the smallest k that meets the target. Agreement grows with k in practice; each step is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from miaotui.export.quantize_rules import NodeDecision
from miaotui.export.smoothing import compensations

SEARCHABLE_REASONS = ("int8", "int8-shifted", "rule-post-gelu", "rule-table-range", "search-int8")  # weight ops only; user include/exclude stay as given
SEARCHABLE_OP_TYPES = ("MatMul", "Gemm", "Gather")


@dataclass
class NodeSensitivity:
    node: str
    op_type: str
    sqnr_db: float  # the node's output against its FP32 output, itself alone quantized
    macs: float  # multiply-accumulates per sample (0 for a table lookup)
    priority: float = 0.0  # noise power per share of the float cost: keep the highest in float first


@dataclass
class SearchStep:
    kept_float: int  # how many of the ranked nodes were kept in float
    agreement: float
    met: bool


@dataclass
class SearchReport:
    target: float
    held_out: str  # which samples measured the agreement
    samples: int
    ranking: list[NodeSensitivity] = field(default_factory=list)
    steps: list[SearchStep] = field(default_factory=list)
    kept_float: list[str] = field(default_factory=list)
    agreement: float = 0.0
    met: bool = False
    seconds: float = 0.0


def searchable(decisions: list[NodeDecision]) -> list[str]:
    return [d.name for d in decisions if d.reason in SEARCHABLE_REASONS and d.op_type in SEARCHABLE_OP_TYPES]


def all_int8(decisions: list[NodeDecision]) -> list[NodeDecision]:
    """Every searchable node INT8 (the search's starting point)."""
    names = set(searchable(decisions))
    return [replace(d, quantized=True, reason="search-int8") if d.name in names else d for d in decisions]


def with_float(decisions: list[NodeDecision], kept: set[str]) -> list[NodeDecision]:
    return [replace(d, quantized=False, reason="search-float") if d.name in kept else d for d in decisions]


def _dequantized_inputs(int8_model) -> dict[str, tuple]:
    """DQ output -> ("weight", dequantized array) or ("activation", scale, zero point) of the
    QuantizeLinear before it: what an INT8 node's input is made of."""
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in int8_model.graph.initializer}
    quantizers = {n.output[0]: n for n in int8_model.graph.node if n.op_type == "QuantizeLinear"}

    def zero_of(node, dtype=np.int8):
        return arrays[node.input[2]] if len(node.input) > 2 and node.input[2] in arrays else np.zeros((), dtype)

    found = {}
    for node in int8_model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[1] not in arrays:
            continue
        if node.input[0] in arrays:
            values, scale = arrays[node.input[0]].astype(np.float32), arrays[node.input[1]].astype(np.float32)
            zero = zero_of(node).astype(np.float32)
            if np.ndim(scale) == 1 and values.ndim > 1:  # per channel: broadcast along `axis`
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                shape = [1] * values.ndim
                shape[axis] = -1
                scale = scale.reshape(shape)
                zero = zero.reshape(shape) if np.ndim(zero) else zero
            found[node.output[0]] = ("weight", (values - zero) * scale)
        elif node.input[0] in quantizers and quantizers[node.input[0]].input[1] in arrays:
            quantizer = quantizers[node.input[0]]
            found[node.output[0]] = ("activation", arrays[quantizer.input[1]].astype(np.float32), zero_of(quantizer))
    return found


def _fake_quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear as ONNX defines them (round half to even, saturate)."""
    info = np.iinfo(zero.dtype)
    q = np.clip(np.rint(x / scale) + zero.astype(np.float32), info.min, info.max)
    return ((q - zero.astype(np.float32)) * scale).astype(np.float32)


def _run_node(node, inputs: list[np.ndarray]) -> np.ndarray:
    attributes = {a.name: a for a in node.attribute}
    if node.op_type == "MatMul":
        return np.matmul(inputs[0], inputs[1])
    if node.op_type == "Gemm":
        a = inputs[0].T if "transA" in attributes and attributes["transA"].i else inputs[0]
        b = inputs[1].T if "transB" in attributes and attributes["transB"].i else inputs[1]
        alpha = attributes["alpha"].f if "alpha" in attributes else 1.0
        beta = attributes["beta"].f if "beta" in attributes else 1.0
        out = alpha * (a @ b)
        return out + beta * inputs[2] if len(inputs) > 2 and inputs[2] is not None else out
    axis = attributes["axis"].i if "axis" in attributes else 0  # Gather
    return np.take(inputs[0], inputs[1].astype(np.int64), axis=axis)


def sensitivities(fp32_model, int8_model, nodes: list[str], batches: Iterable[dict[str, np.ndarray]]) -> list[NodeSensitivity]:
    """Each node's SQNR, alone quantized, on `batches` (fed to the FP32 model)."""
    from onnx import numpy_helper

    from miaotui.data.datasets import without_labels
    from miaotui.export.layers import sqnr_db
    from miaotui.export.parity import exposing_session

    fp32_nodes = {n.name: n for n in fp32_model.graph.node}
    int8_nodes = {n.name: n for n in int8_model.graph.node}
    initializers = {init.name: numpy_helper.to_array(init) for init in fp32_model.graph.initializer}
    dequantized = _dequantized_inputs(int8_model)
    # A shifted node's output is completed by a constant (smoothing's compensation): its SQNR is
    # measured on the completed output, as for any other node. The INT8 graph's constant is
    # computed from its INT8 weights (compensate_shifts).
    completion = compensations(fp32_model)
    int8_completion = compensations(int8_model)
    wanted = sorted({name for n in nodes for name in fp32_nodes[n].input if name and name not in initializers}
                    | {fp32_nodes[n].output[0] for n in nodes})
    session = exposing_session(fp32_model, wanted)
    signal = dict.fromkeys(nodes, 0.0)
    noise = dict.fromkeys(nodes, 0.0)
    macs = dict.fromkeys(nodes, 0.0)
    samples = 0
    for feed in batches:
        feed = without_labels(feed)
        values = dict(zip(wanted, session.run(wanted, feed)))
        samples += len(next(iter(feed.values())))
        for name in nodes:
            node, quantized = fp32_nodes[name], int8_nodes.get(name)
            inputs, fake = [], []
            for index, tensor in enumerate(node.input):
                value = values.get(tensor, initializers.get(tensor)) if tensor else None
                inputs.append(value)
                source = quantized.input[index] if quantized is not None and index < len(quantized.input) else None
                kind = dequantized.get(source)
                if kind is None or value is None:
                    fake.append(value)
                elif kind[0] == "weight":
                    fake.append(kind[1])
                else:
                    fake.append(_fake_quantize(value, kind[1], kind[2]))
            expected = values[node.output[0]].astype(np.float64) + completion.get(node.output[0], 0.0)
            actual = _run_node(node, fake).astype(np.float64)
            actual += int8_completion.get(node.output[0], completion.get(node.output[0], 0.0))
            signal[name] += float(np.sum(expected**2))
            noise[name] += float(np.sum((expected - actual) ** 2))
            if node.op_type in ("MatMul", "Gemm"):
                macs[name] += float(np.prod(expected.shape)) * inputs[0].shape[-1]
    results = []
    for name in nodes:
        results.append(NodeSensitivity(name, fp32_nodes[name].op_type, sqnr_db(signal[name], noise[name]),
                                       macs[name] / max(samples, 1)))
    return results


def rank(items: list[NodeSensitivity]) -> list[NodeSensitivity]:
    """Most sensitive first (lowest SQNR); among nodes within half a dB of each other, the one that is
    cheaper to keep in float (fewer multiply-accumulates) first. `priority` is the noise power per
    share of the float cost, recorded for the reader."""
    total = sum(i.macs for i in items) or 1.0
    for item in items:
        noise = 10 ** (-item.sqnr_db / 10) if np.isfinite(item.sqnr_db) else 0.0
        item.priority = float(noise / max(item.macs / total, 1e-3))
    return sorted(items, key=lambda i: (round(i.sqnr_db * 2) / 2, i.macs))


def bisect_float_count(ranked: list[str], target: float, measure: Callable[[set[str]], float],
                       steps: list[SearchStep]) -> int:
    """The smallest k whose first-k-in-float agreement meets `target` (len(ranked) + 1 when none does)."""

    def meets(k: int) -> bool:
        agreement = measure(set(ranked[:k]))
        steps.append(SearchStep(k, round(agreement, 6), agreement >= target))
        return agreement >= target

    if meets(0):
        return 0
    low, high = 0, len(ranked)  # low fails; high not measured yet
    if not meets(high):
        return len(ranked) + 1
    while high - low > 1:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle
    return high


SENSITIVITY_SAMPLES = 64  # the FP32 pass with every searchable node's tensors exposed: memory-bounded


def search_float_nodes(fp32_model, fp32_path, calibration, decisions: list[NodeDecision], held_out, target: float,
                       output: str, external: bool, progress: bool = True) -> tuple[list[NodeDecision], SearchReport]:
    """(the decisions with the fewest searchable nodes in float that meet `target`, the report).

    `fp32_model` / `fp32_path`: the (smoothed) FP32 graph the calibration ranges belong to;
    `decisions`: every searchable node INT8 (all_int8); `held_out`: a HeldOut of calibration samples."""
    import itertools
    import tempfile
    import time
    from pathlib import Path

    import onnx

    from miaotui.artifacts import sha256_file
    from miaotui.data.datasets import rebatch, sample_rows
    from miaotui.export.quantize import compare_top1, quantize_onnx

    started = time.perf_counter()
    names = searchable(decisions)
    report = SearchReport(target, held_out.where, held_out.count)
    reference_key = (sha256_file(fp32_path), held_out.fingerprint)
    with tempfile.TemporaryDirectory(prefix="miaotui-search-") as folder:
        everything = Path(folder) / "all.int8.onnx"
        quantize_onnx(fp32_model, everything, calibration, decisions, external)
        rows = itertools.islice(sample_rows(held_out.batches()), SENSITIVITY_SAMPLES)
        report.ranking = rank(sensitivities(fp32_model, onnx.load(str(everything)), names, rebatch(rows)))
        order = [item.node for item in report.ranking]

        def measure(kept: set[str]) -> float:
            candidate = everything
            if kept:
                chosen = with_float(decisions, kept)
                if not any(d.quantized for d in chosen):
                    return 1.0  # nothing left in INT8: the FP32 graph itself
                candidate = Path(folder) / f"float{len(kept)}.int8.onnx"
                quantize_onnx(fp32_model, candidate, calibration, chosen, external)
            agreement = compare_top1(fp32_path, candidate, held_out.batches(), output, progress,
                                     label=f"search: {len(kept)} in float", reference_key=reference_key)
            return agreement.top1_agreement

        count = bisect_float_count(order, target, measure, report.steps)
    report.met = count <= len(order)
    report.kept_float = order[:count] if report.met else order
    measured = {step.kept_float: step.agreement for step in report.steps}
    report.agreement = measured.get(len(report.kept_float), max(measured.values()))
    report.seconds = round(time.perf_counter() - started, 3)
    return with_float(decisions, set(report.kept_float)), report
