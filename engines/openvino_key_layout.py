"""Keys projected in the layout the attention kernel reads, for the openvino backend.

OpenVINO's CPU plugin runs a ScaledDotProductAttention as one kernel that reads Q and V as their
projections write them ([batch, seq, heads, size]) but K as K^T ([batch, heads, size, seq]), and its
tokenizer leaves ops on that input outside the kernel (mha_tokenization.cpp, ticket 160177). So the
transpose runs as a node of its own, moving one element at a time: in INT8 on a reference kernel,
0.85 ms a layer for MiniLM at 32 x 128 on a Zen 5 EPYC, 3.5% of the call at one thread; NNCF's IRs
run it too. A product writes whichever layout its operands' order asks for: per row of the batch
K^T = W^T X^T, so the key projection becomes MatMul(W^T, X, transpose_b) writing [batch, heads x
size, seq], reshaped to [batch, heads, size, seq] without moving a value, and the kernel reads it as
it is (the Transpose handed to the attention's K input folds into the kernel's own).

The values are the graph's own (the same INT8 weights, scales, bias and quantizer), with one
difference in where the weights' per-channel scales go: the CPU plugin fuses a product's scales only
per output column (the last axis; dnnl_postops_composer refuses others at compile time), and the
output channels are now rows. The product keeps one scale (the largest), the rest go into an
elementwise Multiply with the bias and K's quantizer: one node reading the product, about 0.3 ms a
layer at 32 x 128, against the transpose's 0.85 (benchmarks/NOTES.md, twenty-fourth session).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# The layouts an attention takes K in, as permutations of [batch, seq, heads, size]
_SEQ_THEN_SIZE = [0, 2, 1, 3]  # [batch, heads, seq, size]: ScaledDotProductAttention; MatMul(Q, K, transpose_b)
_SIZE_THEN_SEQ = [0, 2, 3, 1]  # [batch, heads, size, seq]: MatMul(Q, K^T), the kernel's own
_SCORE_OPS = {"Multiply", "Divide", "Add"}  # what may stand between Q x K^T and its Softmax (scale, mask)


@dataclass
class _KeyProjection:
    reader: Any  # the input K is read at: a ScaledDotProductAttention's, or the scores MatMul's second
    layout: list[int]  # the layout it reads K in (_SEQ_THEN_SIZE or _SIZE_THEN_SEQ)
    activations: Any  # the projection's input X, [batch, seq, width in]
    weights: np.ndarray  # int8 [width out, width in]
    scales: np.ndarray  # float32 [width out]
    bias: np.ndarray | None  # float32 [width out]
    quantizer: Any  # K's FakeQuantize node, or None (float attention)
    heads: int
    size: int


def _only_reader(output) -> bool:
    return len(output.get_target_inputs()) == 1


def _constant(output) -> np.ndarray | None:
    node = output.get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None


def _compose(orders: list[list[int]]) -> list[int]:
    """The permutation of Transposes applied one after another."""
    axes = list(range(len(orders[0]))) if orders else []
    for order in orders:
        axes = [axes[i] for i in order]
    return axes


def _int8_weights(output) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 weights [rows, columns], scale per column or one) of Multiply(Convert(int8 constant), scale)."""
    multiply = output.get_node()
    if multiply.get_type_name() != "Multiply":
        return None
    convert = multiply.input(0).get_source_output().get_node()
    scales = _constant(multiply.input(1).get_source_output())
    if convert.get_type_name() != "Convert" or scales is None:
        return None
    levels = _constant(convert.input(0).get_source_output())
    if levels is None or levels.dtype != np.int8 or levels.ndim != 2:
        return None
    return levels, np.asarray(scales, np.float32)


def _key_readers(model) -> list[tuple[Any, list[int]]]:
    """(input, the layout it takes K in) of each attention in `model`: a ScaledDotProductAttention (as the
    ONNX frontend fuses one) or the MatMul of Q x K^T whose scores reach a Softmax over the last axis through
    scale and mask ops (as Hugging Face's eager attention exports)."""
    readers = []
    for op in model.get_ordered_ops():
        if op.get_type_name() == "ScaledDotProductAttention":
            readers.append((op.input(1), _SEQ_THEN_SIZE))
        elif op.get_type_name() == "Softmax" and op.get_attributes()["axis"] in (-1, 3) \
                and op.get_output_partial_shape(0).rank.get_length() == 4:
            node = op.input(0).get_source_output().get_node()
            for _ in range(3):
                if node.get_type_name() not in _SCORE_OPS:
                    break
                node = node.input(0).get_source_output().get_node()
            if node.get_type_name() == "MatMul" and not node.get_attributes()["transpose_a"]:
                readers.append((node.input(1), _SEQ_THEN_SIZE if node.get_attributes()["transpose_b"] else _SIZE_THEN_SEQ))
    return readers


def _key_projection(reader, layout: list[int]) -> _KeyProjection | None:
    """The K path read at `reader` when it is Transposes (to `layout`) <- Reshape [batch, seq, heads, size] <-
    (FakeQuantize) <- (Add bias) <- MatMul(X, int8 weights), each read by the next alone; else None."""
    output = reader.get_source_output()
    orders = []
    while output.get_node().get_type_name() == "Transpose":
        order = _constant(output.get_node().input(1).get_source_output())
        if order is None or not _only_reader(output):
            return None
        orders.insert(0, [int(axis) for axis in order])
        output = output.get_node().input(0).get_source_output()
    reshape = output.get_node()
    if reshape.get_type_name() != "Reshape" or not _only_reader(output) or _compose(orders) != layout:
        return None
    split, whole = reshape.get_output_partial_shape(0), reshape.get_input_partial_shape(0)
    if split.rank.is_dynamic or split.rank.get_length() != 4 or not split[3].is_static or whole.rank.is_dynamic \
            or whole.rank.get_length() != 3 or not whole[2].is_static:
        return None
    width, size = whole[2].get_length(), split[3].get_length()
    heads = width // size
    if width % size or (split[2].is_static and split[2].get_length() != heads):
        return None
    output = reshape.input(0).get_source_output()
    quantizer = bias = None
    if output.get_node().get_type_name() == "FakeQuantize":
        quantizer = output.get_node()
        ranges = [_constant(quantizer.input(i).get_source_output()) for i in range(1, 5)]
        if not _only_reader(output) or any(r is None or r.size != 1 for r in ranges):
            return None  # per-channel K ranges would be per row of the product: not taken
        output = quantizer.input(0).get_source_output()
    if output.get_node().get_type_name() == "Add":
        add = output.get_node()
        bias = _constant(add.input(1).get_source_output())
        if bias is None or bias.size != heads * size or not _only_reader(output):
            return None
        bias = np.asarray(bias, np.float32).reshape(-1)
        output = add.input(0).get_source_output()
    matmul = output.get_node()
    if matmul.get_type_name() != "MatMul" or not _only_reader(output) or matmul.get_attributes()["transpose_a"]:
        return None
    activations = matmul.input(0).get_source_output()
    weights = _int8_weights(matmul.input(1).get_source_output())
    rank = activations.get_partial_shape().rank
    if weights is None or rank.is_dynamic or rank.get_length() != 3:
        return None
    levels, scales = weights
    transposed = matmul.get_attributes()["transpose_b"]
    if not transposed:
        levels = levels.T  # [width in, width out] -> [width out, width in]
    per_output = (heads * size, 1) if transposed else (1, heads * size)  # a scale per output channel, or one
    if levels.shape[0] != heads * size or (scales.size != 1 and scales.shape[-2:] != per_output) \
            or not np.all(scales > 0):
        return None
    scales = np.broadcast_to(scales.reshape(-1), (heads * size,)).astype(np.float32)
    return _KeyProjection(reader, layout, activations, np.ascontiguousarray(levels), scales, bias, quantizer, heads, size)


def keys_in_attention_layout(model) -> int:
    """Rewrites, in place, each attention's key projection that matches _key_projection into the kernel's
    layout (the module's docstring says how); returns how many."""
    from openvino import opset13 as ops

    found = [k for k in (_key_projection(reader, layout) for reader, layout in _key_readers(model)) if k is not None]
    for key in found:
        column_scale = float(key.scales.max())
        weights = ops.multiply(ops.convert(ops.constant(key.weights), "f32"),
                               ops.constant(np.array([[column_scale]], np.float32)))
        product = ops.matmul(weights, key.activations, transpose_a=False, transpose_b=True)  # [batch, width, seq]
        # special_zero: 0 keeps the batch dim; -1 the sequence length
        split = ops.reshape(product, ops.constant(np.array([0, key.heads, key.size, -1], np.int64)), special_zero=True)
        per_row = (key.scales / column_scale).reshape(1, key.heads, key.size, 1).astype(np.float32)
        keys = split if np.all(per_row == 1) else ops.multiply(split, ops.constant(per_row))  # one scale: none left
        if key.bias is not None:
            keys = ops.add(keys, ops.constant(key.bias.reshape(1, key.heads, key.size, 1)))
        if key.quantizer is not None:
            keys = ops.fake_quantize(keys, *[key.quantizer.input(i).get_source_output() for i in range(1, 5)],
                                     key.quantizer.get_attributes()["levels"])
        if key.layout == _SEQ_THEN_SIZE:  # the kernel folds this Transpose into its own K^T
            keys = ops.transpose(keys, ops.constant(np.array([0, 1, 3, 2], np.int64)))
        key.reader.replace_source_output(keys.output(0))
    if found:
        model.validate_nodes_and_infer_types()
    return len(found)
