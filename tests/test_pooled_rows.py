"""The last layer narrowed to the pooled token (export/pooled_rows.py): the same answers from fewer rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from polygraphy.backend.onnx import infer_shapes

from miaotui.export.pooled_rows import narrow_to_pooled_rows


def _shape(model, name: str) -> list:
    for info in (*model.graph.value_info, *model.graph.output):
        if info.name == name:
            return [d.dim_value or d.dim_param for d in info.type.tensor_type.shape.dim]
    raise KeyError(name)


def _run(model, feed: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _pooled_graph(pool: str, extra_output: bool = False):
    """x [batch, seq, 4] -> MatMul -> Relu -> pooling -> logits: `pool` "first" (Gather of index 0 on
    the sequence axis), "mean" (ReduceMean over it) or "second" (Gather of index 1)."""
    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5, "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"])]
    initializers = [weight]
    if pool == "mean":
        initializers.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"))
        nodes.append(helper.make_node("ReduceMean", ["r", "axes"], ["logits"], keepdims=0))
    else:
        initializers.append(numpy_helper.from_array(np.array(0 if pool == "first" else 1, dtype=np.int64), "index"))
        nodes.append(helper.make_node("Gather", ["r", "index"], ["logits"], axis=1))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", "seq", 3]))
    graph = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])],
                              outputs, initializers)
    return infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_first_token_pooling_narrows_the_rows_it_reads():
    model = _pooled_graph("first")
    feed = {"x": np.random.default_rng(0).normal(size=(3, 7, 4)).astype(np.float32)}
    expected = _run(model, feed)

    report = narrow_to_pooled_rows(model)
    model = infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    assert (report.narrowed_nodes, report.slices) == (2, 1)  # MatMul and Relu; one Slice of the input
    assert _shape(model, "h") == ["batch", 1, 3] and _shape(model, "r") == ["batch", 1, 3]
    np.testing.assert_array_equal(_run(model, feed), expected)
    one_token = {"x": feed["x"][:, :1]}  # a sequence of one: the Slice keeps the only row
    np.testing.assert_array_equal(_run(model, one_token), _run(_pooled_graph("first"), one_token))


@pytest.mark.parametrize("pool, extra_output", [("mean", False), ("second", False), ("first", True)])
def test_graphs_that_read_other_rows_are_left_alone(pool: str, extra_output: bool):
    """Mean pooling reads every row, a Gather of index 1 another row, and a graph output of the hidden
    state all of them: nothing may be narrowed."""
    model = _pooled_graph(pool, extra_output)
    before = model.SerializeToString()
    assert narrow_to_pooled_rows(model).narrowed_nodes == 0
    assert model.SerializeToString() == before


def _optimized_checkpoint(root: Path, family: str) -> tuple:
    """A tiny random checkpoint of `family` through export and optimize, as `miaotui run` does."""
    pytest.importorskip("transformers")
    from test_huggingface import make_project, write_texts

    from miaotui.config import load_config
    from miaotui.stages import run_optimize_stage

    write_texts(root / "calibration.csv", "calibration", 64)
    write_texts(root / "validation.csv", "validation", 64)
    config = load_config(make_project(root, family, root))
    return config, run_optimize_stage(config, root / "work")


def _same_logits(config, optimized_path: Path) -> None:
    """model.opt.onnx answers like model.onnx on padded texts and on a one-token text."""
    from miaotui.data.tokenizers import encode, load_tokenizer

    from test_huggingface import TEXTS

    optimized, exported = onnx.load(str(optimized_path)), onnx.load(str(optimized_path.parent / "model.onnx"))
    tokenizer = load_tokenizer(config.model.tokenizer, 128)
    for texts in (TEXTS, ["好"], TEXTS * 5):
        feed = encode(tokenizer, texts, names=list(config.inputs))
        np.testing.assert_allclose(_run(optimized, feed), _run(exported, feed), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> tuple:
    return _optimized_checkpoint(tmp_path_factory.mktemp("pooled"), "bert")


def test_a_bert_checkpoint_runs_its_last_layer_on_the_first_token(tiny_bert):
    """The pooler reads hidden[:, 0]: the last layer computes its query side, output projection,
    feed-forward block and LayerNorms on that row, its keys and values on every token; the logits are
    those of the whole graph, padded rows and a one-token text included."""
    config, result = tiny_bert
    assert result.details["pooled_row_nodes"] >= 20  # BERT's last layer from the query projection on
    optimized = onnx.load(str(result.path))
    pooling = next(n for n in optimized.graph.node if n.op_type == "Gather" and helper.get_attribute_value(n.attribute[0]) == 1)
    assert _shape(optimized, pooling.input[0]) == ["batch", 1, 32]
    # The last layer's keys still see every token: its K projection's output keeps the sequence axis.
    matmuls = [n for n in optimized.graph.node if n.op_type == "MatMul"]
    rows = [_shape(optimized, n.output[0])[-2] for n in matmuls]
    assert rows.count(1) == 6 and rows.count("seq") == len(rows) - 6  # Q, scores, context, out, up, down

    _same_logits(config, result.path)
    assert "(" in result.check and "on the pooled token only" in result.check


def test_deberta_heads_split_through_the_batch_axis_are_narrowed_too(tmp_path: Path):
    """DeBERTa reshapes its heads into the batch axis ([batch * heads, seq, size]): the row axis and the
    ones after it are kept there, so the attention context is narrowed through those Reshapes as well."""
    config, result = _optimized_checkpoint(tmp_path, "deberta-v2")
    optimized = onnx.load(str(result.path))
    # The Reshapes that regroup the axes before the row axis: [2*batch, 1, 16] -> [batch, 2, 1, 16] and back.
    regrouped = [(_shape(optimized, n.input[0]), _shape(optimized, n.output[0])) for n in optimized.graph.node
                 if n.op_type == "Reshape" and n.input[1].endswith("__rows0_shape_full")]
    assert regrouped and all(source[-2] == output[-2] == 1 and source[0] != output[0] for source, output in regrouped)
    assert result.details["pooled_row_nodes"] >= 20
    _same_logits(config, result.path)
