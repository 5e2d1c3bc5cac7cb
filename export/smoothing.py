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

One-sided activations (GELU's outputs, >= -0.17, read by a transformer's FFN down-projection) are
also shifted per channel (Wei et al., Outlier Suppression+, 2023): X' = (X - z) / s with z_j the
middle of channel j's range, so a symmetric INT8 grid (all TensorRT takes) is not half spent on
negatives that never come. X W = X' (s W) + (z / s)(s W): the second term is a constant row added
after the MatMul, computed from the INT8 weights once they exist (`compensate_shifts`), since
computed from the float weights it would leave (X - z)/s times the weights' rounding error. Measured
on minilm-sentiment's six FFN down-projections (benchmarks/NOTES.md): output SQNR 20-36 dB
unshifted, 16-35 dB smoothed at alpha 0.5, 33-45 dB shifted at alpha 0.85; top-1 agreement of the
model with them in INT8 0.9819 unshifted (smoothing off), 0.9977 shifted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

SMOOTH_SUFFIX = "_smoothed"
COMPENSATION_SUFFIX = "_shift_compensation"
# A tensor is one-sided when no channel goes below -ONE_SIDED times the tensor's highest value.
ONE_SIDED = 0.1
# Smoothing strength for shifted (one-sided) activations: after centering, their outlier channels
# are still 5-10x the median one; 0.85 maximized the FFN down-projections' SQNR on minilm-sentiment
# (0.5: 22-40 dB, 0.75: 32-44, 0.85: 33-45, 0.95: 30-45).
SHIFTED_ALPHA = 0.85
# The smoothed FP32 graph against model.opt.onnx: the same function, rounded differently.
SMOOTHING_ATOL = 1e-4


@dataclass(frozen=True)
class SmoothedInput:
    tensor: str  # the activation that was smoothed
    matmuls: tuple[str, ...]  # the nodes that now read tensor + SMOOTH_SUFFIX
    max_factor: float  # the largest s_j: how much outlier was moved into the weights
    shifted: bool = False  # centered per channel (one-sided activation), compensated after each MatMul
    alpha: float = 0.0
    peak: float = 0.0  # the rewritten activation's largest |value|, from its channel ranges


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


def channel_ranges(model, tensors: list[str], batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """[lowest, highest] per last-axis channel of each tensor over all batches (shape 2 x channels),
    one batch in memory at a time."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    graph = augmented.graph
    ranks = _ranks(augmented)
    outputs = []
    for index, tensor in enumerate(tensors):
        axes = f"miaotui_range_axes_{index}"
        graph.initializer.append(onnx.numpy_helper.from_array(np.arange(ranks[tensor] - 1, dtype=np.int64), axes))
        for op in ("ReduceMin", "ReduceMax"):
            graph.node.append(helper.make_node(op, [tensor, axes], [f"{tensor}__{op}"], keepdims=0,
                                               name=f"miaotui_{op}_{index}"))
            graph.output.append(helper.make_tensor_value_info(f"{tensor}__{op}", onnx.TensorProto.FLOAT, None))
            outputs.append(f"{tensor}__{op}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ranges: dict[str, np.ndarray] = {}
    for feed in batches:
        values = session.run(outputs, feed)
        for index, tensor in enumerate(tensors):
            low, high = values[2 * index], values[2 * index + 1]
            if tensor in ranges:
                low, high = np.minimum(ranges[tensor][0], low), np.maximum(ranges[tensor][1], high)
            ranges[tensor] = np.stack([low, high])
    return ranges


def is_one_sided(channel_range: np.ndarray) -> bool:
    low, high = channel_range
    return float(high.max()) > 0 and float(low.min()) >= -ONE_SIDED * float(high.max())


def smooth(model, targets: dict[str, list], ranges: dict[str, np.ndarray], alpha: float) -> list[SmoothedInput]:
    """Rewrite `model` in place: X -> (X - z) / s on each target activation (z = 0 unless it is
    one-sided), s folded into the weights, and z's contribution added back after each MatMul."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    done = []
    insert_at = {output: index for index, node in enumerate(model.graph.node) for output in node.output}
    matmul_at = {node.name: index for index, node in enumerate(model.graph.node)}
    new_nodes = []
    for tensor, matmuls in targets.items():
        weights = [numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32) for node in matmuls]
        weight_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        low, high = ranges[tensor].astype(np.float64)
        if low.shape != weight_peak.shape:
            continue
        shifted = is_one_sided(ranges[tensor])
        strength = SHIFTED_ALPHA if shifted else alpha
        center = (low + high) / 2 if shifted else np.zeros_like(low)
        activation_peak = np.maximum(np.abs(low - center), np.abs(high - center))
        # Channels that are all zero (in data or in weights) keep factor 1.
        live = (activation_peak > 0) & (weight_peak > 0)
        factor = np.ones_like(activation_peak)
        factor[live] = activation_peak[live] ** strength / weight_peak[live] ** (1 - strength)
        factor = np.clip(factor, 1e-4, 1e4).astype(np.float32)
        smoothed = tensor + SMOOTH_SUFFIX
        for node, weight in zip(matmuls, weights):
            name = node.input[1]
            scaled_weight = (weight * factor[:, None]).astype(np.float32)
            scaled = numpy_helper.from_array(scaled_weight, name)
            if readers.get(name, 0) > 1:  # a weight shared with another reader gets its own copy
                scaled.name = f"{name}{SMOOTH_SUFFIX}_{node.name}"
                model.graph.initializer.append(scaled)
                node.input[1] = scaled.name
            else:
                initializers[name].CopyFrom(scaled)
            node.input[0] = smoothed
            if shifted:
                # Exact in FP32 here; compensate_shifts redoes it with the INT8 weights.
                output = node.output[0]
                node.output[0] = f"{output}{COMPENSATION_SUFFIX}_input"
                constant = f"{output}{COMPENSATION_SUFFIX}"
                shift = (center / factor).astype(np.float32)
                model.graph.initializer.append(numpy_helper.from_array(shift @ scaled_weight, constant))
                add = helper.make_node("Add", [node.output[0], constant], [output], name=f"{node.name}{COMPENSATION_SUFFIX}")
                new_nodes.append((matmul_at[node.name], add))
        inverse = f"{tensor}{SMOOTH_SUFFIX}_inverse_factor"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / factor).astype(np.float32), inverse))
        source = tensor
        if shifted:
            source = f"{tensor}{SMOOTH_SUFFIX}_centered"
            model.graph.initializer.append(numpy_helper.from_array(center.astype(np.float32), f"{tensor}{SMOOTH_SUFFIX}_center"))
            new_nodes.append((insert_at.get(tensor, -1), helper.make_node(
                "Sub", [tensor, f"{tensor}{SMOOTH_SUFFIX}_center"], [source], name=f"{tensor}{SMOOTH_SUFFIX}_sub")))
        mul = helper.make_node("Mul", [source, inverse], [smoothed], name=f"{tensor}{SMOOTH_SUFFIX}_mul")
        new_nodes.append((insert_at.get(tensor, -1), mul))
        info = next((i for i in list(model.graph.value_info) + list(model.graph.input) if i.name == tensor), None)
        if info is not None:  # the quantizer and calibrator find float tensors by their value_info
            for name in [smoothed] + ([source] if shifted else []):
                copy = model.graph.value_info.add()
                copy.CopyFrom(info)
                copy.name = name
        peak = float(np.max(activation_peak / factor))
        done.append(SmoothedInput(tensor, tuple(node.name for node in matmuls), float(factor.max()), shifted, strength, peak))
    # Each new node goes right after the node it reads from, in the order made (Sub before Mul),
    # keeping the node list topologically sorted.
    for _, (position, node) in sorted(enumerate(new_nodes), key=lambda item: (item[1][0], item[0]), reverse=True):
        model.graph.node.insert(position + 1, node)
    return done


def shifted_ranges(smoothed: list[SmoothedInput]) -> dict[str, tuple[float, float]]:
    """The INT8 range of each shifted input, from its channel ranges (both signs), whatever the
    calibration method: entropy's threshold on the folded |x| histogram of a shifted tensor cut its
    positive tail (minilm-sentiment: top-1 agreement 0.57)."""
    return {item.tensor + SMOOTH_SUFFIX: (-item.peak, item.peak) for item in smoothed if item.shifted}


def compensations(model) -> dict[str, np.ndarray]:
    """MatMul output -> the constant its shift compensation adds back."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    return {add.input[0]: numpy_helper.to_array(initializers[add.input[1]]) for add in model.graph.node
            if add.name.endswith(COMPENSATION_SUFFIX)}


def compensate_shifts(model) -> int:
    """Recompute each shift compensation of a quantized `model` (in place) from the weights as INT8
    stores them: (z / s) @ dequantize(W'). Returns how many were recomputed (those whose MatMul
    stayed float are already exact)."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(initializers[name]).astype(np.float64)

    done = 0
    for add in model.graph.node:
        if add.op_type != "Add" or not add.name.endswith(COMPENSATION_SUFFIX):
            continue
        matmul = producers[add.input[0]]
        weight = producers.get(matmul.input[1])
        activation = producers.get(matmul.input[0])
        if weight is None or weight.op_type != "DequantizeLinear":
            continue
        values, scale = array(weight.input[0]), array(weight.input[1])
        zero = array(weight.input[2]) if len(weight.input) > 2 and weight.input[2] else 0.0
        dequantized = (values - zero) * scale  # per output channel: the scale broadcasts over rows
        # Walk back from the activation's Q/DQ to the Mul by 1/s and the Sub of z.
        while activation is not None and activation.op_type in ("DequantizeLinear", "QuantizeLinear"):
            activation = producers.get(activation.input[0])
        if activation is None or activation.op_type != "Mul":
            raise ValueError(f"{add.name}: expected the smoothing Mul before {matmul.name}")
        subtract = producers[activation.input[0]]
        shift = array(subtract.input[1]) * array(activation.input[1])
        initializers[add.input[1]].CopyFrom(numpy_helper.from_array((shift @ dequantized).astype(np.float32), add.input[1]))
        done += 1
    return done


def _ranks(model) -> dict[str, int]:
    ranks = {}
    for info in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        shape = info.type.tensor_type.shape
        ranks[info.name] = len(shape.dim)
    return ranks
