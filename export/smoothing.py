"""SmoothQuant-style smoothing: move activation outliers into the weights before INT8 calibration.

A transformer's LayerNorm outputs carry a few channels far larger than the rest, and one per-tensor
INT8 scale for the MatMul that reads them is set by those channels, crushing the others. For each
activation X read by INT8 MatMuls with weights W, channel j is divided by s_j and row j of every W
multiplied by it (X W = (X / s) (s W)), with s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)
(Xiao et al., SmoothQuant, 2023). The FP32 graph answers the same; INT8 now sees flat activations.

The division is an explicit Mul on the branch to the MatMuls, since in a post-LN BERT the same
LayerNorm output also feeds a residual Add that must stay unscaled. ONNX Runtime's own SmoothQuant
needs Intel Neural Compressor (not a dependency here) and folds into the previous op only, which this
graph does not allow; hence this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

SMOOTH_SUFFIX = "_smoothed"
# The smoothed FP32 graph against model.opt.onnx: the same function, rounded differently.
SMOOTHING_ATOL = 1e-4


@dataclass(frozen=True)
class SmoothedInput:
    tensor: str  # the activation that was smoothed
    matmuls: tuple[str, ...]  # the nodes that now read tensor + SMOOTH_SUFFIX
    max_factor: float  # the largest s_j: how much outlier was moved into the weights


def smoothing_targets(model, quantized: set[str]) -> dict[str, list]:
    """Activation -> the INT8 MatMul nodes reading it with a 2-D weight as their second input."""
    weights = {init.name: init for init in model.graph.initializer}
    targets: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name not in quantized:
            continue
        activation, weight = node.input[0], node.input[1]
        if activation in weights or weight not in weights or len(weights[weight].dims) != 2:
            continue
        targets.setdefault(activation, []).append(node)
    return targets


def channel_peaks(model, tensors: list[str], batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each tensor over all batches, one batch in memory at a time."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    graph = augmented.graph
    ranks = _ranks(augmented)
    outputs = []
    for index, tensor in enumerate(tensors):
        axes = f"miaotui_peak_axes_{index}"
        graph.initializer.append(onnx.numpy_helper.from_array(np.arange(ranks[tensor] - 1, dtype=np.int64), axes))
        graph.node.append(helper.make_node("Abs", [tensor], [f"{tensor}__abs"], name=f"miaotui_abs_{index}"))
        graph.node.append(helper.make_node("ReduceMax", [f"{tensor}__abs", axes], [f"{tensor}__peak"], keepdims=0,
                                           name=f"miaotui_peak_{index}"))
        graph.output.append(helper.make_tensor_value_info(f"{tensor}__peak", onnx.TensorProto.FLOAT, None))
        outputs.append(f"{tensor}__peak")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])
    peaks: dict[str, np.ndarray] = {}
    for feed in batches:
        for tensor, value in zip(tensors, session.run(outputs, feed)):
            peaks[tensor] = value if tensor not in peaks else np.maximum(peaks[tensor], value)
    return peaks


def smooth(model, targets: dict[str, list], peaks: dict[str, np.ndarray], alpha: float) -> list[SmoothedInput]:
    """Rewrite `model` in place: a Mul by 1/s on each target activation, s folded into the weights."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    done = []
    insert_at = {output: index for index, node in enumerate(model.graph.node) for output in node.output}
    new_nodes = []
    for tensor, matmuls in targets.items():
        weights = [numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32) for node in matmuls]
        weight_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        activation_peak = peaks[tensor].astype(np.float64)
        if activation_peak.shape != weight_peak.shape:
            continue
        # Channels that are all zero (in data or in weights) keep factor 1.
        live = (activation_peak > 0) & (weight_peak > 0)
        factor = np.ones_like(activation_peak)
        factor[live] = activation_peak[live] ** alpha / weight_peak[live] ** (1 - alpha)
        factor = np.clip(factor, 1e-4, 1e4).astype(np.float32)
        for node, weight in zip(matmuls, weights):
            name = node.input[1]
            scaled = numpy_helper.from_array((weight * factor[:, None]).astype(np.float32), name)
            if readers.get(name, 0) > 1:  # a weight shared with another reader gets its own copy
                scaled.name = f"{name}{SMOOTH_SUFFIX}_{node.name}"
                model.graph.initializer.append(scaled)
                node.input[1] = scaled.name
            else:
                initializers[name].CopyFrom(scaled)
            node.input[0] = tensor + SMOOTH_SUFFIX
        inverse = f"{tensor}{SMOOTH_SUFFIX}_inverse_factor"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / factor).astype(np.float32), inverse))
        mul = helper.make_node("Mul", [tensor, inverse], [tensor + SMOOTH_SUFFIX], name=f"{tensor}{SMOOTH_SUFFIX}_mul")
        new_nodes.append((insert_at.get(tensor, -1), mul))
        info = next((i for i in list(model.graph.value_info) + list(model.graph.input) if i.name == tensor), None)
        if info is not None:  # the quantizer and calibrator find float tensors by their value_info
            copy = model.graph.value_info.add()
            copy.CopyFrom(info)
            copy.name = tensor + SMOOTH_SUFFIX
        done.append(SmoothedInput(tensor, tuple(node.name for node in matmuls), float(factor.max())))
    # Each Mul goes right after its input's producer, keeping the node list topologically sorted.
    for position, mul in sorted(new_nodes, key=lambda item: item[0], reverse=True):
        model.graph.node.insert(position + 1, mul)
    return done


def _ranks(model) -> dict[str, int]:
    ranks = {}
    for info in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        shape = info.type.tensor_type.shape
        ranks[info.name] = len(shape.dim)
    return ranks
