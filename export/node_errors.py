"""Each INT8 node's own quantization error, measured with everything before it in FP32.

One FP32 pass exposes each node's inputs and output. The node is evaluated again in numpy with its
inputs as the INT8 graph has them: activations fake-quantized with the scale of the QuantizeLinear
before it, weights dequantized from the INT8 graph's initializers. The difference from the FP32
output is the node's own error: the search ranks nodes by its power (SQNR), bias correction removes
its mean. numpy evaluates the node because ONNX Runtime cannot run one node of a graph on another
graph's intermediate tensors.

Positions where the padding mask is 0 (padded tokens) are not counted: what a padded position holds
never reaches the logits (mean pooling and attention ignore it), yet its activations are out of
the calibrated distribution and would dominate the noise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from miaotui.export.smoothing import compensations


@dataclass
class NodeError:
    node: str
    op_type: str
    signal: float = 0.0  # sum of squares of the FP32 output over the counted positions
    noise: float = 0.0  # sum of squares of (INT8 - FP32) over the same positions
    error_sum: np.ndarray | None = None  # per output channel (last axis): sum of (INT8 - FP32)
    positions: int = 0  # counted positions (rows of the output along its last axis)
    macs: float = 0.0  # multiply-accumulates over every sample (0 for a table lookup)
    samples: int = 0

    @property
    def mean_error(self) -> np.ndarray:
        """Per output channel: the error's mean, what a bias correction subtracts."""
        return self.error_sum / max(self.positions, 1)


def real_positions(value: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """`value` as rows of its last axis, only those of real (mask 1) positions when its leading axes
    are the mask's (batch, sequence), or (batch, heads, sequence, ...) as attention lays them out."""
    value = np.asarray(value)
    if value.ndim == 0:
        return value.reshape(1, 1)
    if mask is not None and value.ndim >= 3:
        keep = mask.astype(bool)
        if value.shape[:2] == keep.shape:
            return value[keep].reshape(-1, value.shape[-1])
        if value.ndim == 4 and value.shape[0] == keep.shape[0] and value.shape[2] == keep.shape[1]:
            return np.moveaxis(value, 2, 1)[keep].reshape(-1, value.shape[-1])
    return value.reshape(-1, value.shape[-1])


def dequantized_inputs(int8_model) -> dict[str, tuple]:
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


def fake_quantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """QuantizeLinear then DequantizeLinear as ONNX defines them (round half to even, saturate)."""
    info = np.iinfo(zero.dtype)
    q = np.clip(np.rint(x / scale) + zero.astype(np.float32), info.min, info.max)
    return ((q - zero.astype(np.float32)) * scale).astype(np.float32)


def run_node(node, inputs: list[np.ndarray]) -> np.ndarray:
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
    if node.op_type == "Gather":
        axis = attributes["axis"].i if "axis" in attributes else 0
        return np.take(inputs[0], inputs[1].astype(np.int64), axis=axis)
    raise ValueError(f"{node.name}: no numpy evaluation for {node.op_type}")


def node_errors(fp32_model, int8_model, nodes: list[str], batches: Iterable[dict[str, np.ndarray]],
                mask_input: str | None = None, corrections: Mapping[str, np.ndarray] | None = None
                ) -> dict[str, NodeError]:
    """Each of `nodes`' own error on `batches` (fed to the FP32 model). `corrections` (node -> per
    channel mean error) are subtracted from the INT8 outputs first, as a corrected bias would."""
    from onnx import numpy_helper

    from miaotui.data.datasets import without_labels
    from miaotui.export.parity import exposing_session

    fp32_nodes = {n.name: n for n in fp32_model.graph.node}
    int8_nodes = {n.name: n for n in int8_model.graph.node}
    initializers = {init.name: numpy_helper.to_array(init) for init in fp32_model.graph.initializer}
    dequantized = dequantized_inputs(int8_model)
    corrections = corrections or {}
    # A shifted node's output is completed by a constant (smoothing's compensation): its error is
    # measured on the completed output, as for any other node. The INT8 graph's constant is
    # computed from its INT8 weights (compensate_shifts).
    completion = compensations(fp32_model)
    int8_completion = compensations(int8_model)
    wanted = sorted({name for n in nodes for name in fp32_nodes[n].input if name and name not in initializers}
                    | {fp32_nodes[n].output[0] for n in nodes})
    session = exposing_session(fp32_model, wanted)
    results = {name: NodeError(name, fp32_nodes[name].op_type) for name in nodes}
    for feed in batches:
        feed = without_labels(feed)
        mask = feed.get(mask_input) if mask_input else None
        keep = mask.astype(bool) if mask is not None else None
        values = dict(zip(wanted, session.run(wanted, feed)))
        for name in nodes:
            node, quantized = fp32_nodes[name], int8_nodes.get(name)
            output = node.output[0]
            # A weight op works row by row: evaluate the real positions only (a third of MiniLM's
            # calibration batches; the rest is padding).
            by_rows = keep is not None and values[output].shape[:2] == keep.shape
            inputs, fake = [], []
            for index, tensor in enumerate(node.input):
                value = values.get(tensor, initializers.get(tensor)) if tensor else None
                if by_rows and tensor in values and value.shape[:2] == keep.shape:
                    value = value[keep]
                inputs.append(value)
                source = quantized.input[index] if quantized is not None and index < len(quantized.input) else None
                kind = dequantized.get(source)
                if kind is None or value is None:
                    fake.append(value)
                elif kind[0] == "weight":
                    fake.append(kind[1])
                else:
                    fake.append(fake_quantize(value, kind[1], kind[2]))
            # float32 arithmetic (the errors are 1e-2..1e-4 of the values, float32 resolves 1e-7),
            # float64 sums: MiniLM's FFN outputs are large and this pass runs in every quantize
            if by_rows:
                expected = values[output][keep].reshape(-1, values[output].shape[-1]).astype(np.float32)
                actual = run_node(node, fake).astype(np.float32)
                actual = actual.reshape(-1, actual.shape[-1])
                if actual.shape != expected.shape:
                    raise ValueError(f"{name}: its output is not row by row in its inputs ({actual.shape} vs {expected.shape})")
            else:
                expected = real_positions(values[output], mask).astype(np.float32)
                actual = real_positions(run_node(node, fake), mask).astype(np.float32)
            expected += completion.get(output, np.float32(0))
            actual += int8_completion.get(output, completion.get(output, np.float32(0)))
            if name in corrections:
                actual -= corrections[name]
            error = actual - expected
            result = results[name]
            result.signal += float(np.einsum("ij,ij->", expected, expected, dtype=np.float64))
            result.noise += float(np.einsum("ij,ij->", error, error, dtype=np.float64))
            sums = error.sum(axis=0, dtype=np.float64)
            result.error_sum = sums if result.error_sum is None else result.error_sum + sums
            result.positions += len(error)
            result.samples += len(values[output])
            if node.op_type in ("MatMul", "Gemm"):
                result.macs += float(np.prod(values[output].shape)) * inputs[0].shape[-1]
    return results
