"""Accuracy-budgeted mixed precision: which nodes to keep in float so INT8 meets a top-1 agreement target.

1. Start from the rules' graph: every weight op (MatMul/Gemm/Gather over a weight) the rules put in
   INT8 is searchable; what the rules keep in float stays float (weight tables cost nothing to keep
   in float, and the rules' other float choices are accuracy cliffs). That graph is quantized once,
   with ONNX Runtime's quantizer and the calibrated ranges.
2. Sensitivity, one FP32 pass: each node's own quantization noise, with everything before it in
   FP32 (export/node_errors.py): its FP32 input quantized with the scale the INT8 graph holds, its
   weights the INT8 graph's, its bias corrected as every trial graph's is (bias correction), the
   output compared with FP32's over real tokens (signal-to-quantization-noise ratio, SQNR, in dB).
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

SEARCHABLE_REASONS = ("int8", "int8-shifted", "search-int8")  # the rules' INT8 weight ops; user include/exclude stay as given
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
    # The searchable nodes' multiply-accumulates that stay INT8, as a share of all of theirs: what is
    # left of the INT8 speed-up, roughly (the benchmark measures it: benchmarks/search_minilm.py).
    int8_macs_share: float = 1.0


def searchable(decisions: list[NodeDecision]) -> list[str]:
    return [d.name for d in decisions
            if d.quantized and d.reason in SEARCHABLE_REASONS and d.op_type in SEARCHABLE_OP_TYPES]


def from_rules(decisions: list[NodeDecision]) -> list[NodeDecision]:
    """The rules' decisions with their INT8 weight ops marked as the search's (its starting point)."""
    names = set(searchable(decisions))
    return [replace(d, reason="search-int8") if d.name in names else d for d in decisions]


def with_float(decisions: list[NodeDecision], kept: set[str]) -> list[NodeDecision]:
    return [replace(d, quantized=False, reason="search-float") if d.name in kept else d for d in decisions]


def sensitivities(fp32_model, int8_model, nodes: list[str], batches: Iterable[dict[str, np.ndarray]],
                  mask_input: str | None = None, corrections: dict[str, np.ndarray] | None = None) -> list[NodeSensitivity]:
    """Each node's SQNR, alone quantized (its bias corrected by `corrections`), on `batches` (fed to the
    FP32 model), counting only real positions where the model has a padding mask."""
    from miaotui.export.layers import sqnr_db
    from miaotui.export.node_errors import node_errors

    errors = node_errors(fp32_model, int8_model, nodes, batches, mask_input, corrections)
    return [NodeSensitivity(name, errors[name].op_type, sqnr_db(errors[name].signal, errors[name].noise),
                            errors[name].macs / max(errors[name].samples, 1)) for name in nodes]


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


def search_float_nodes(fp32_model, fp32_path, everything, calibration, decisions: list[NodeDecision], held_out,
                       target: float, output: str, external: bool, progress: bool = True, mask_input: str | None = None,
                       corrections: dict[str, np.ndarray] | None = None) -> tuple[list[NodeDecision], SearchReport]:
    """(the decisions with the fewest searchable nodes in float that meet `target`, the report).

    `fp32_model` / `fp32_path`: the (smoothed) FP32 graph the calibration ranges belong to;
    `decisions`: the rules' (from_rules), as the file `everything` has them;
    `held_out`: a HeldOut of calibration samples; `corrections`: bias corrections (measured on
    `everything`) that every trial graph gets, as the final one will."""
    import itertools
    import tempfile
    import time
    from pathlib import Path

    import onnx

    from miaotui.artifacts import sha256_file
    from miaotui.data.datasets import rebatch, sample_rows
    from miaotui.export.quantize import compare_top1, correct_biases, quantize_onnx

    started = time.perf_counter()
    names = searchable(decisions)
    report = SearchReport(target, held_out.where, held_out.count)
    reference_key = (sha256_file(fp32_path), held_out.fingerprint)
    with tempfile.TemporaryDirectory(prefix="miaotui-search-") as folder:
        rows = itertools.islice(sample_rows(held_out.batches()), SENSITIVITY_SAMPLES)
        report.ranking = rank(sensitivities(fp32_model, onnx.load(str(everything)), names, rebatch(rows), mask_input,
                                            corrections))
        if corrections:
            corrected = Path(folder) / "all.int8.onnx"
            correct_biases(everything, corrected, corrections, external)
            everything = corrected
        order = [item.node for item in report.ranking]

        def measure(kept: set[str]) -> float:
            candidate = everything
            if kept:
                chosen = with_float(decisions, kept)
                if not any(d.quantized for d in chosen):
                    return 1.0  # nothing left in INT8: the FP32 graph itself
                candidate = Path(folder) / f"float{len(kept)}.int8.onnx"
                quantize_onnx(fp32_model, candidate, calibration, chosen, external, corrections)
            agreement = compare_top1(fp32_path, candidate, held_out.batches(), output, progress,
                                     label=f"search: {len(kept)} in float", reference_key=reference_key)
            return agreement.top1_agreement

        count = bisect_float_count(order, target, measure, report.steps)
    report.met = count <= len(order)
    report.kept_float = order[:count] if report.met else order
    measured = {step.kept_float: step.agreement for step in report.steps}
    report.agreement = measured.get(len(report.kept_float), max(measured.values()))
    macs = {item.node: item.macs for item in report.ranking}
    total = sum(macs.values())
    if total:
        report.int8_macs_share = round(1 - sum(macs[n] for n in report.kept_float) / total, 4)
    report.seconds = round(time.perf_counter() - started, 3)
    return with_float(decisions, set(report.kept_float)), report
