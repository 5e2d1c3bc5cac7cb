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

A shifted channel far above the rest (one GELU unit of MiniLM's first layer peaks at 11x the
median channel) is a problem on both sides of the INT8 MatMul: smoothing moves most of it into its
weight row, which then sets the INT8 step of every output column (31x the other rows there), and
what is left still sets the activation's step (twice the next channel). Such a channel gets the
factor that puts its weight row at the other rows' peak and is split into m copies, each carrying
1/m of it (outlier channel splitting, Zhao et al., ICML 2019): the MatMul that makes the GELU's
input gets m - 1 more copies of that output column (and bias entry), the GELU runs on them as on
any channel, and the down-projection reads each copy divided by m with the channel's weight row.
The same sum in FP32, both steps set by ordinary channels in INT8, and no new op (a float side
branch, Gather x W + Add, was as accurate and cost a third of the ONNX Runtime engine's time at batch
32: memory passes over [batch, seq, 1536]).
On minilm-sentiment it is the largest single gain in agreement (benchmarks/NOTES.md).
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
# A shifted input channel whose peak is above this many times the median channel's is split
# (at most MAX_SPLIT per tensor, into at most MAX_COPIES). minilm-sentiment: 5 channels of 9,216 in
# its FFN down-projections' inputs, into 10-59 copies (180 more columns over 4 FFNs of 1,536, and
# 76 zero ones to keep each width a multiple of 64).
SPLIT_MEDIANS = 6.0
MAX_SPLIT = 8
MAX_COPIES = 64
WIDTH_MULTIPLE = 64
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
    split: tuple[int, ...] = ()  # channels split into copies (outlier channel splitting)
    copies: tuple[int, ...] = ()  # how many copies each of them became


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


def split_channels(activation_peak: np.ndarray) -> np.ndarray:
    """The channels (at most MAX_SPLIT, in channel order) whose peak is above SPLIT_MEDIANS x the median."""
    median = float(np.median(activation_peak))
    if median <= 0:
        return np.zeros(0, np.int64)
    highest = np.argsort(activation_peak)[::-1][:MAX_SPLIT]
    return np.sort(highest[activation_peak[highest] > SPLIT_MEDIANS * median]).astype(np.int64)


def _widenable(tensor: str, matmuls: list, producers: dict, readers: dict[str, int], initializers: dict):
    """(MatMul, bias Add or None, elementwise op) when `tensor` = op(MatMul(x, W) [+ b]) with a 2-D W
    and b, every one read once and `tensor` only by `matmuls`: a chain whose channels can be copied
    by copying W's columns. None otherwise."""
    activation = producers.get(tensor)
    if activation is None or activation.op_type not in ("Gelu", "Relu") or readers.get(tensor, 0) != len(matmuls):
        return None
    source = producers.get(activation.input[0])
    bias = None
    if source is not None and source.op_type == "Add" and readers.get(source.output[0], 0) == 1:
        constant = next((name for name in source.input if name in initializers), None)
        if constant is None or len(initializers[constant].dims) != 1:
            return None
        bias, source = source, producers.get(next(name for name in source.input if name != constant))
    if source is None or source.op_type != "MatMul" or readers.get(source.output[0], 0) != 1:
        return None
    weight = initializers.get(source.input[1])
    if weight is None or len(weight.dims) != 2 or readers.get(source.input[1], 0) != 1:
        return None
    return source, bias, activation


def _widen(model, chain, initializers: dict, extra: np.ndarray, pad: int) -> None:
    """Append copies of the output channels `extra` (indices, repeats allowed) and `pad` zero channels
    to the chain's MatMul weight and bias; shapes recorded for its tensors are widened the same way."""
    from onnx import numpy_helper

    matmul, bias, activation = chain
    weight = numpy_helper.to_array(initializers[matmul.input[1]])
    initializers[matmul.input[1]].CopyFrom(numpy_helper.from_array(
        np.concatenate([weight, weight[:, extra], np.zeros((weight.shape[0], pad), weight.dtype)], axis=1), matmul.input[1]))
    tensors = {matmul.output[0], activation.output[0]}
    if bias is not None:
        name = next(n for n in bias.input if n in initializers)
        values = numpy_helper.to_array(initializers[name])
        initializers[name].CopyFrom(numpy_helper.from_array(
            np.concatenate([values, values[extra], np.zeros(pad, values.dtype)]), name))
        tensors.add(bias.output[0])
    for info in model.graph.value_info:
        dims = info.type.tensor_type.shape.dim
        if info.name in tensors and len(dims) and dims[-1].HasField("dim_value"):
            dims[-1].dim_value = weight.shape[1] + len(extra) + pad


def smooth(model, targets: dict[str, list], ranges: dict[str, np.ndarray], alpha: float) -> list[SmoothedInput]:
    """Rewrite `model` in place: X -> (X - z) / s on each target activation (z = 0 unless it is
    one-sided), s folded into the weights, and z's contribution added back after each MatMul; a
    shifted activation's outlier channels split into copies where the chain making it allows."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    done = []
    insert_at = {output: index for index, node in enumerate(model.graph.node) for output in node.output}
    # Built once: the renames below (a shifted MatMul's output) leave a chain that makes a shifted
    # input either as it was or refused by its read counts, so no target needs a fresh map.
    producers = {output: node for node in model.graph.node for output in node.output}
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
        split, copies = np.zeros(0, np.int64), np.zeros(0, np.int64)
        chain = _widenable(tensor, matmuls, producers, readers, initializers) if shifted else None
        if chain is not None:
            split = split_channels(activation_peak)
            split = split[weight_peak[split] > 0]
            rest = np.setdiff1d(np.arange(len(factor)), split)
            if len(split) and rest.size:
                # Smoothed, an outlier's weight row would set the INT8 step of every output column (31x
                # the other rows on MiniLM's first FFN): its factor puts the row at the others' peak, and
                # enough copies put each copy's input under theirs.
                row_peak = float(np.max(factor[rest] * weight_peak[rest]))
                input_peak = float(np.max(activation_peak[rest] / factor[rest]))
                factor[split] = (row_peak / weight_peak[split]).astype(np.float32)
                copies = np.ceil(activation_peak[split] / factor[split] / input_peak - 1e-6).astype(np.int64)
                copies = np.clip(copies, 1, MAX_COPIES)
        divisor = np.ones_like(factor)  # each copy of a split channel reads 1 / copies of it
        if len(split):
            # Channel j becomes copies[j] channels, each (x_j - z_j) / (copies[j] s_j) with the row s_j w_j.
            extra = np.repeat(split, copies - 1)
            # INT8 GEMM kernels step through K in blocks (64 for AMX tiles): zero channels (a zero
            # column, bias and row) keep the widened dimension a multiple of 64 where it was one.
            pad = -(len(factor) + len(extra)) % WIDTH_MULTIPLE if len(factor) % WIDTH_MULTIPLE == 0 else 0
            _widen(model, chain, initializers, extra, pad)
            divisor[split] = copies

            def grown(values: np.ndarray, fill: float) -> np.ndarray:
                return np.concatenate([values, values[extra], np.full((pad, *values.shape[1:]), fill, values.dtype)])

            factor, center, divisor = grown(factor, 1.0), grown(center, 0.0), grown(divisor, 1.0)
            activation_peak = grown(activation_peak, 0.0)
            weights = [grown(w, 0.0) for w in weights]
        input_factor = factor * divisor  # what the activation is divided by (the weights take `factor`)
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
                shift = (center / input_factor).astype(np.float32)
                model.graph.initializer.append(numpy_helper.from_array(shift @ scaled_weight, constant))
                add = helper.make_node("Add", [node.output[0], constant], [output], name=f"{node.name}{COMPENSATION_SUFFIX}")
                new_nodes.append((matmul_at[node.name], add))
        inverse = f"{tensor}{SMOOTH_SUFFIX}_inverse_factor"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / input_factor).astype(np.float32), inverse))
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
        peak = float(np.max(activation_peak / input_factor))
        done.append(SmoothedInput(tensor, tuple(node.name for node in matmuls), float(factor.max()), shifted, strength, peak,
                                  tuple(int(c) for c in split), tuple(int(c) for c in copies)))
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
