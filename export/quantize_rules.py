"""Which nodes become INT8: rules derived from measurement, then the user's --include / --exclude.

Every node on float data whose op type ONNX Runtime's quantizer knows, or that carries weights with
no INT8 form (recurrent layers), gets a decision with its reason; quantization.json lists them all. The rules
and the measurements behind them (benchmarks/quantize_rules.py reruns them):

- Only ops that hold weights and do the multiply-accumulates are INT8 by default: MatMul, Gemm,
  Conv, ConvTranspose, and Gather over a weight table (embeddings, INT8 storage). Quantizing every
  op type ONNX Runtime supports (its default) put Q/DQ pairs around Add, Mul, Softmax and friends:
  on minilm-sentiment TensorRT-RTX refused the graph ("Quantized constant ... is only allowed
  before DQ") and top-1 agreement with FP32 fell to 0.82.
- A Gather over a weight table is INT8 (storage: the rows are looked up, then dequantized) only
  when one per-tensor INT8 scale holds the table: SQNR of the table itself >= 30 dB, about the
  INT8 MatMuls' own. A lookup does no arithmetic, so a float table costs file size, not speed.
  MiniLM's tables fail it (word 27 dB, position 15 dB: a few values 40-75x their RMS); in INT8 they
  were the noisiest nodes of the model (top-1 agreement on the test split 0.9887 -> 0.9921 kept
  float). lstm-sentiment's table (40 dB) would pass it, but:
- A Gather whose rows reach a recurrent layer (through Transpose, Reshape and the like) stays float:
  with those rows in INT8, TensorRT-RTX 1.7 failed to build lstm-sentiment's graph whenever the
  sequence dim's minimum was above 1 (Myelin "Expected ... to be equal to 1 in reshape op"), and
  removing the Q/DQ after the lookup, transposing the ids first or an INT8 Gather before the DQ
  did not help; with the table float it builds (tests/test_lstm_sentiment.py).
- MatMuls whose two inputs are both activations (attention: Q x K^T and softmax x V) stay float:
  per-tensor scales on attention scores lose the small probabilities that carry the signal.
- MatMuls fed by Gelu (transformer FFN down-projections) are INT8 only with smoothing on: their
  activations are one-sided (>= -0.17) and heavy-tailed, and smoothing shifts each channel to the
  middle of its range before scaling it (export/smoothing.py). On minilm-sentiment (validation
  split, benchmarks/quantize_rules.py): top-1 agreement 0.9977 shifted, 0.9955 with them float
  (and the engine 1.4x slower at batch 32), 0.9819 in INT8 unshifted with smoothing off; an earlier
  run smoothed them as the LayerNorm outputs are (alpha 0.5): 0.958. With smoothing off
  (smooth_alpha = 0) they stay float.
- Recurrent layers (LSTM, GRU, RNN) stay float: ONNX Runtime's QDQ quantizer has no rule for them
  (its INT8 LSTM is the contrib op DynamicQuantizeLSTM, which is not plain ONNX and which TensorRT
  cannot parse), and TensorRT's ONNX parser takes no Q/DQ into its recurrent layers.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from miaotui.errors import InputError

DEFAULT_OP_TYPES = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather")
MIN_TABLE_SQNR_DB = 30.0  # a weight table stays INT8 at or above this per-tensor SQNR
RECURRENT_OP_TYPES = ("LSTM", "GRU", "RNN")

# reason -> what quantization.json and the summary say about it
REASONS = {
    "int8": "quantized: weights per channel, activations per tensor, symmetric INT8",
    "user-include": "quantized because --include matched it",
    "user-exclude": "kept in float because --exclude matched it",
    "quantizer-skipped": "left float by ONNX Runtime's quantizer: a data-movement op is INT8 only where its input "
                         "already is",
    "op-not-supported": "no INT8 form for a recurrent layer: ONNX Runtime's QDQ quantizer has no LSTM/GRU/RNN rule "
                        "(its INT8 LSTM is the contrib op DynamicQuantizeLSTM: not plain ONNX, TensorRT cannot parse "
                        "it) and TensorRT takes no Q/DQ into its recurrent layers",
    "rule-op-type": "rule: only weight-carrying ops (MatMul, Gemm, Conv, Gather over weights) are INT8 by default; "
                    "Q/DQ around elementwise and data-movement ops made TensorRT refuse the graph and cost accuracy",
    "rule-activation-matmul": "rule: both inputs are activations (attention scores or context): per-tensor INT8 "
                              "loses the small attention probabilities",
    "rule-post-gelu": "rule: input comes from Gelu (FFN down-projection) and smoothing is off: heavy-tailed, "
                      "one-sided activations that one per-tensor scale cannot hold unshifted",
    "int8-shifted": "quantized after smoothing shifted its one-sided (post-GELU) input to the middle of each "
                    "channel's range and scaled it; the shift is added back after the MatMul",
    "rule-gather-not-weights": "rule: gathers from a computed tensor, not from a weight table",
    "rule-table-range": "rule: one per-tensor INT8 scale does not hold this table (its SQNR is under 30 dB: a few "
                        "values far above the rest); a lookup does no arithmetic, so float costs size, not speed",
    "rule-gather-recurrent": "rule: the looked-up rows feed a recurrent layer, which stays float: INT8 rows reaching "
                             "it made TensorRT-RTX 1.7 fail to build whenever the sequence dim's minimum is above 1 "
                             "(Myelin: 'Expected ... to be equal to 1 in reshape op'); a lookup does no arithmetic, "
                             "so float costs size, not speed",
    "search-int8": "quantized: the accuracy-budgeted search (--target-agreement) met the target with it in INT8",
    "search-float": "kept in float by the accuracy-budgeted search: among the nodes with the most quantization "
                    "noise per unit of float cost, and the target was not met with it in INT8",
}


@dataclass(frozen=True)
class NodeDecision:
    name: str
    op_type: str
    quantized: bool
    reason: str  # a key of REASONS
    matched: str | None = None  # the --include / --exclude pattern that decided it

    def explain(self) -> str:
        text = REASONS[self.reason]
        return f"{text} ({self.matched})" if self.matched else text


def candidate_op_types() -> set[str]:
    """Op types ONNX Runtime's quantizer can write as QDQ, plus weight-carrying ops with no INT8 form."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry) | set(RECURRENT_OP_TYPES)


def plan_quantization(model, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                      smoothing: bool = True) -> list[NodeDecision]:
    """One decision for each candidate node of `model` (an onnx.ModelProto with inferred shapes).
    `smoothing`: whether the quantize stage smooths (and shifts) INT8 MatMul inputs.

    Patterns are fnmatch globs matched against node names and op types ("node_MatMul_48", "*ffn*",
    "Gather"); --exclude wins over --include, and both win over the rules.
    """
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    float_tensors = _float_tensors(model)
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    candidates = candidate_op_types()

    def matching(patterns: tuple[str, ...], node) -> str | None:
        return next((p for p in patterns if fnmatch.fnmatchcase(node.name, p) or fnmatch.fnmatchcase(node.op_type, p)), None)

    used_include: set[str] = set()
    used_exclude: set[str] = set()
    decisions = []
    for node in graph.node:
        if node.op_type not in candidates or node.domain not in ("", "ai.onnx"):
            continue
        rule = _rule(node, weights, float_tensors, producers, consumers)
        if rule == "rule-post-gelu" and smoothing:
            rule = "int8-shifted"
        if rule == "not-float":  # shapes, indexes, masks: not quantizable, not listed
            continue
        if rule == "op-not-supported":
            decisions.append(NodeDecision(node.name, node.op_type, False, rule))
            continue
        excluded, included = matching(exclude, node), matching(include, node)
        if excluded:
            used_exclude.add(excluded)
            decisions.append(NodeDecision(node.name, node.op_type, False, "user-exclude", f"--exclude {excluded}"))
        elif included:
            used_include.add(included)
            decisions.append(NodeDecision(node.name, node.op_type, True, "user-include", f"--include {included}"))
        else:
            decisions.append(NodeDecision(node.name, node.op_type, rule in ("int8", "int8-shifted"), rule))

    for flag, patterns, used in (("--include", include, used_include), ("--exclude", exclude, used_exclude)):
        for pattern in patterns:
            if pattern not in used:
                raise InputError(f"{flag} {pattern}: matches no quantizable node (patterns match node names "
                                 "and op types; `miaotui inspect MODEL.onnx` lists the ops)")
    return decisions


# The quantizer writes Q/DQ on these ops' inputs only (OpTypesToExcludeOutputQuantization in quantize.py).
FLOAT_OUTPUT_OP_TYPES = ("MatMul", "Gemm", "Conv", "ConvTranspose")


def tensors_to_calibrate(model, decisions: list[NodeDecision]) -> tuple[str, ...]:
    """The activations whose ranges the quantizer reads: the float inputs of every INT8 node (not
    its weights) and, for ops whose outputs get Q/DQ too (a Gather's, say), their outputs."""
    quantized = {d.name for d in decisions if d.quantized}
    weights = {init.name for init in model.graph.initializer}
    floats = _float_tensors(model)
    tensors = set()
    for node in model.graph.node:
        if node.name not in quantized:
            continue
        names = [name for name in node.input if name] + ([] if node.op_type in FLOAT_OUTPUT_OP_TYPES else list(node.output))
        tensors.update(name for name in names if name and name not in weights and name in floats)
    return tuple(sorted(tensors))


def table_sqnr_db(table) -> float:
    """Signal-to-quantization-noise ratio of a weight table (TensorProto) in symmetric per-tensor INT8."""
    from onnx import numpy_helper

    from miaotui.export.layers import sqnr_db

    values = numpy_helper.to_array(table).astype(np.float64)
    peak = float(np.abs(values).max()) if values.size else 0.0
    if peak == 0.0:
        return float("inf")
    scale = peak / 127
    noise = values - np.clip(np.rint(values / scale), -127, 127) * scale
    return sqnr_db(float(np.sum(values**2)), float(np.sum(noise**2)))


# Ops that move data without computing on it: a lookup seen through them still feeds what follows.
DATA_MOVEMENT_OP_TYPES = ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast", "Flatten")


def _feeds_recurrent(node, consumers: dict) -> bool:
    """Whether `node`'s output reaches an LSTM/GRU/RNN through data-movement ops only."""
    pending, seen = list(node.output), set()
    while pending:
        name = pending.pop()
        for reader in consumers.get(name, []):
            if reader.op_type in RECURRENT_OP_TYPES:
                return True
            if reader.op_type in DATA_MOVEMENT_OP_TYPES and reader.name not in seen:
                seen.add(reader.name)
                pending += list(reader.output)
    return False


def _rule(node, weights: dict, float_tensors: set[str], producers: dict, consumers: dict) -> str:
    if node.op_type in RECURRENT_OP_TYPES:
        return "op-not-supported"
    data_inputs = [name for name in node.input if name]
    if node.op_type in ("Gather", "GatherElements"):
        data_inputs = data_inputs[:1]
    if not any(name in float_tensors for name in data_inputs):
        return "not-float"
    if node.op_type not in DEFAULT_OP_TYPES:
        return "rule-op-type"
    if node.op_type == "Gather" and node.input[0] not in weights:
        return "rule-gather-not-weights"
    if node.op_type == "Gather" and table_sqnr_db(weights[node.input[0]]) < MIN_TABLE_SQNR_DB:
        return "rule-table-range"
    if node.op_type == "Gather" and _feeds_recurrent(node, consumers):
        return "rule-gather-recurrent"
    if node.op_type == "MatMul":
        if not any(name in weights for name in node.input[:2]):
            return "rule-activation-matmul"
        if any(name in producers and producers[name].op_type == "Gelu" for name in node.input[:2]):
            return "rule-post-gelu"
    return "int8"


def _float_tensors(model) -> set[str]:
    import onnx

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    graph = model.graph
    names = {init.name for init in graph.initializer if init.data_type in floats}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        if info.type.tensor_type.elem_type in floats:
            names.add(info.name)
    return names
