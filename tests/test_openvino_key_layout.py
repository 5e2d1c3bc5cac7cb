"""Keys projected in the layout the attention kernel reads (engines/openvino_key_layout.py), on small
OpenVINO graphs built here: an INT8 key projection (int8 weights with a scale per output channel, a
bias, K's quantizer) read by a ScaledDotProductAttention or by Hugging Face's eager Q x K^T."""

from __future__ import annotations

import collections

import numpy as np
import pytest

ov = pytest.importorskip("openvino")

HEADS, SIZE, SEQ, WIDTH = 2, 16, 24, 32


def _quantizer(source, bound: float):
    from openvino import opset13 as ops

    low, high = (ops.constant(np.array(v, np.float32).reshape(1, 1, 1)) for v in (-bound, bound))
    return ops.fake_quantize(source, low, high, low, high, 256)


def _projection(x, rng, quantize_output: bool, scale_shape=(1, WIDTH)):
    """X (quantized) times int8 weights [in, out] with a scale per output channel, plus a bias; quantized too."""
    from openvino import opset13 as ops

    levels = rng.integers(-127, 128, (WIDTH, WIDTH)).astype(np.int8)
    scales = rng.uniform(0.002, 0.02, scale_shape).astype(np.float32)  # differ per channel, as calibrated ones do
    weights = ops.multiply(ops.convert(ops.constant(levels), "f32"), ops.constant(scales))
    out = ops.add(ops.matmul(x, weights, False, False), ops.constant(rng.normal(0, 0.3, WIDTH).astype(np.float32)))
    return _quantizer(out, 2.0) if quantize_output else out


def _heads(out, order):
    from openvino import opset13 as ops

    split = ops.reshape(out, ops.constant(np.array([0, 0, HEADS, SIZE], np.int64)), special_zero=True)
    return ops.transpose(split, ops.constant(np.array(order, np.int64)))


def _attention_model(form: str, quantize_k: bool = True, second_reader: bool = False, k_scale_shape=(1, WIDTH)):
    """One attention block over X: "sdpa" (the ONNX frontend's fused op) or "eager" (MatMul(Q, K^T), scale,
    mask, Softmax, MatMul), all three projections INT8."""
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([-1, -1, WIDTH], np.float32, name="x")
    mask = ops.parameter([-1, 1, 1, -1], np.float32, name="mask")
    xq = _quantizer(x, 3.0)
    q, v = (_heads(_projection(xq, rng, True), [0, 2, 1, 3]) for _ in range(2))
    k_out = _projection(xq, rng, quantize_k, k_scale_shape)
    if form == "sdpa":
        k = _heads(k_out, [0, 2, 1, 3])
        context = ops.scaled_dot_product_attention(q, k, v, mask, ops.constant(np.float32(SIZE ** -0.5)), causal=False)
    else:
        k = _heads(k_out, [0, 2, 3, 1])
        scores = ops.add(ops.multiply(ops.matmul(q, k, False, False), ops.constant(np.float32(SIZE ** -0.5))), mask)
        context = ops.matmul(ops.softmax(scores, -1), v, False, False)
    outputs = [ops.result(context)]
    if second_reader:  # K's projection also read elsewhere: the rewrite must leave it
        outputs.append(ops.result(ops.relu(k_out)))
    return ov.Model(outputs, [x, mask], "attention")


def _feed(rows: int = 3):
    rng = np.random.default_rng(1)
    mask = np.zeros((rows, 1, 1, SEQ), np.float32)
    mask[0, ..., SEQ // 2:] = -10000.0  # one row padded: the mask reaches the scores
    return {"x": rng.normal(0, 1, (rows, SEQ, WIDTH)).astype(np.float32), "mask": mask}


def _compiled(model):
    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})


def _runtime_types(compiled) -> collections.Counter:
    return collections.Counter(op.get_rt_info()["layerType"].astype(str)
                               for op in compiled.get_runtime_model().get_ordered_ops())


@pytest.mark.parametrize("form", ["sdpa", "eager"])
@pytest.mark.parametrize("quantize_k", [True, False])
def test_keys_come_from_their_projection_transposed_and_the_answers_stay(form: str, quantize_k: bool):
    from miaotui.engines.openvino_key_layout import keys_in_attention_layout

    before, after = _attention_model(form, quantize_k), _attention_model(form, quantize_k)
    assert keys_in_attention_layout(after) == 1
    compiled = {name: _compiled(model) for name, model in (("before", before), ("after", after))}
    types = {name: _runtime_types(c) for name, c in compiled.items()}
    # K's projection is a product with the weights first now (no FullyConnected), and its transpose is gone
    assert types["after"]["FullyConnected"] == types["before"]["FullyConnected"] - 1
    assert types["after"]["Transpose"] < types["before"]["Transpose"]
    answers = {name: c(_feed())[0] for name, c in compiled.items()}
    # the same int8 weights, scales, bias and quantizer: equal but for float rounding in a different order
    # (in INT8, a K value that lands on a step's edge may round to the next step)
    tolerance = 0.05 if quantize_k else 1e-4
    assert np.abs(answers["after"] - answers["before"]).max() < tolerance * np.abs(answers["before"]).max()


def test_a_projection_read_elsewhere_too_is_left_as_it_is():
    from miaotui.engines.openvino_key_layout import keys_in_attention_layout

    model = _attention_model("sdpa", second_reader=True)
    ops_before = len(model.get_ops())
    assert keys_in_attention_layout(model) == 0
    assert len(model.get_ops()) == ops_before


def test_weights_scaled_per_input_channel_are_left_as_they_are():
    """Scales on the weights' rows [width in, 1] (a graph that is not per output channel) cannot move to the
    product's rows: the projection stays, though its width in equals its width out."""
    from miaotui.engines.openvino_key_layout import keys_in_attention_layout

    assert keys_in_attention_layout(_attention_model("sdpa", k_scale_shape=(WIDTH, 1))) == 0
    assert keys_in_attention_layout(_attention_model("sdpa", k_scale_shape=(1, 1))) == 1  # one scale: taken


def test_a_graph_without_attention_is_left_as_it_is():
    from openvino import opset13 as ops

    from miaotui.engines.openvino_key_layout import keys_in_attention_layout

    x = ops.parameter([-1, WIDTH], np.float32, name="x")
    model = ov.Model([ops.result(ops.softmax(ops.matmul(x, x, False, True), -1))], [x], "no-attention")
    assert keys_in_attention_layout(model) == 0
