"""INT8 LSTM layers for the openvino backend: an OpenVINO model rewritten so that the CPU plugin runs each
LSTMSequence as one INT8 kernel (oneDNN's INT8 LSTM) instead of in float.

The QDQ graph keeps its LSTMs float (ONNX Runtime and TensorRT take no Q/DQ LSTM), so nothing in it says
how to quantize one; what the kernel needs is known from its arithmetic:
- its input X and hidden state H share one 8-bit data grid, and H = o * tanh(c) lies in (-1, 1). So X
  is scaled into the same (-1, 1) by a bound known without calibration (an embedding table's largest
  value, or 1 for another LSTM's states) and the bound moved into the input weights W (X W^T is
  unchanged), then both get FakeQuantize over [-1, 1];
- W and the recurrent weights R share one scale per output row, so each row's scale covers both.
NNCF's transformer scheme quantizes X over its own range (about +-4 on lstm-sentiment) and W and R
separately; the kernel then runs H on X's coarser grid and one matrix on the other's scales: top-1
agreement with PyTorch 0.977 on lstm-sentiment's validation split, 0.9989 this way
(benchmarks/NOTES.md, ninth session). An LSTM whose input has no such bound stays float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Ops that move or reshape values without changing them: a bound on their input bounds their output.
_VALUE_PRESERVING = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Convert"}
_STANDARD_ACTIVATIONS = ["sigmoid", "tanh", "tanh"]  # H = o * tanh(c): |H| < 1
_X, _H0, _W, _R = 0, 1, 4, 5  # LSTMSequence inputs: X, initial H, initial C, sequence lengths, W, R, B


@dataclass(frozen=True)
class LstmBound:
    node: str  # the LSTMSequence's friendly name
    bound: float  # max |X| (1.0 for another LSTM's states)
    source: str  # "embedding table" or "LSTM states"


def _input_bound(output) -> tuple[float, str] | None:
    """max |value| of `output` where it is known without data: a Gather from a constant table (its largest
    entry) or another LSTM's hidden states (its outputs Y and Ho; not Co, the cell state, which has no
    bound), through ops that only move values."""
    while output.get_node().get_type_name() in _VALUE_PRESERVING:
        output = output.get_node().input(0).get_source_output()
    node, kind = output.get_node(), output.get_node().get_type_name()
    if kind == "Gather":
        table = node.input(0).get_source_output().get_node()
        if table.get_type_name() == "Constant":
            values = np.asarray(table.get_data(), dtype=np.float64)
            bound = float(np.abs(values).max()) if values.size else 0.0
            return (bound, "embedding table") if bound > 0 else None
    if kind == "LSTMSequence" and output.get_index() in (0, 1) and \
            node.get_attributes()["activations"] == _STANDARD_ACTIVATIONS:
        return 1.0, "LSTM states"
    return None


def _constant(node_input) -> np.ndarray | None:
    source = node_input.get_source_output().get_node()
    return np.asarray(source.get_data(), dtype=np.float32) if source.get_type_name() == "Constant" else None


def int8_lstm_candidates(model) -> list[LstmBound]:
    """The model's LSTMSequence nodes that can run in INT8: standard activations, constant W and R, and an
    input with a known bound."""
    found = []
    for node in model.get_ordered_ops():
        if node.get_type_name() != "LSTMSequence" or node.get_attributes()["activations"] != _STANDARD_ACTIVATIONS:
            continue
        if _constant(node.input(_W)) is None or _constant(node.input(_R)) is None:
            continue
        bound = _input_bound(node.input(_X).get_source_output())
        if bound is not None:
            found.append(LstmBound(node.get_friendly_name(), *bound))
    return found


def with_int8_lstm(model, bounds: list[LstmBound]):
    """A copy of `model` with each LSTM of `bounds` in INT8 form (the module's docstring says which)."""
    from openvino import opset13 as ops

    copy = model.clone()
    nodes = {node.get_friendly_name(): node for node in copy.get_ordered_ops()}

    def scalar(value: float):
        return ops.constant(np.array(value, np.float32))

    def fake_quantize(source):  # the data grid the kernel shares between X and H: 256 levels over [-1, 1]
        return ops.fake_quantize(source, scalar(-1.0), scalar(1.0), scalar(-1.0), scalar(1.0), 256).output(0)

    for lstm in bounds:
        node = nodes[lstm.node]
        x = node.input(_X).get_source_output()
        if lstm.bound != 1.0:
            x = ops.multiply(x, scalar(1.0 / lstm.bound)).output(0)
        node.input(_X).replace_source_output(fake_quantize(x))
        node.input(_H0).replace_source_output(fake_quantize(node.input(_H0).get_source_output()))
        w = _constant(node.input(_W)) * np.float32(lstm.bound)  # [directions, 4 x hidden, input]
        r = _constant(node.input(_R))
        # one scale per output row for W and R together: the kernel applies one set to both
        scale = np.maximum(np.abs(w).max(axis=-1, keepdims=True), np.abs(r).max(axis=-1, keepdims=True)) / 127.0
        scale[scale == 0] = 1.0
        for index, weights in ((_W, w), (_R, r)):
            levels = np.clip(np.rint(weights / scale), -127, 127).astype(np.int8)
            dequantized = ops.multiply(ops.convert(ops.constant(levels), "f32"), ops.constant(scale.astype(np.float32)))
            node.input(index).replace_source_output(dequantized.output(0))
    copy.validate_nodes_and_infer_types()
    return copy
