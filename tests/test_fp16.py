"""FP16 and INT8+FP16 graphs: half precision where it is safe, FP32 where FP16 breaks, checked by
ONNX Runtime on the CPU, by TensorRT-RTX's strongly typed builder and by the parity gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from miaotui.cli import main
from miaotui.export.fp16 import convert_to_fp16
from miaotui.models import resolve_config


def _tiny_transformer_block(weight: np.ndarray) -> onnx.ModelProto:
    """x [N, 8] -> MatMul -> LayerNormalization -> Softmax -> ReduceSum -> y [N]."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], name="norm", axis=-1),
        helper.make_node("Softmax", ["n"], ["p"], name="softmax", axis=-1),
        helper.make_node("Mul", ["p", "h"], ["m"], name="weigh"),
        helper.make_node("ReduceSum", ["m", "axes"], ["y"], name="pool", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
         numpy_helper.from_array(np.zeros(8, np.float32), "beta"), numpy_helper.from_array(np.array([1]), "axes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_conversion_keeps_io_types_and_the_fragile_ops_in_fp32():
    rng = np.random.default_rng(0)
    model = _tiny_transformer_block(rng.standard_normal((8, 8)).astype(np.float32))
    converted, report = convert_to_fp16(model)
    onnx.checker.check_model(converted, full_check=True)  # typed and topologically sorted
    graph = converted.graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {t.name: t.data_type for t in graph.initializer}["w"] == TensorProto.FLOAT16
    inferred = onnx.shape_inference.infer_shapes(converted).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.output]}
    by_name = {n.name: n for n in graph.node}
    assert types[by_name["proj"].output[0]] == TensorProto.FLOAT16  # the MatMul runs in FP16
    for kept in ("norm", "softmax", "pool"):  # ... its statistics, exponentials and sums in FP32
        assert types[by_name[kept].output[0]] == TensorProto.FLOAT, kept
    assert report.fp32_nodes == {"LayerNormalization": 1, "Softmax": 1, "ReduceSum": 1}
    assert report.casts_added >= 4 and report.values_clamped == 0
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT  # the input model is left as it was
    x = rng.standard_normal((5, 8)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for m in (model, converted)]
    assert np.abs(run[0] - run[1]).max() < 1e-2 and np.abs(run[0] - run[1]).max() > 0  # FP16 rounding, no more


def test_weights_beyond_the_fp16_range_are_reported():
    weight = np.full((8, 8), 0.5, np.float32)
    weight[0, 0] = 1e5
    _, report = convert_to_fp16(_tiny_transformer_block(weight))
    assert report.values_clamped == 1


@pytest.mark.parametrize("precision", ["fp16", "int8-fp16"])
def test_default_model_in_half_precision_passes_the_gate_and_builds_with_tensorrt_rtx(lstm_work: Path, precision: str):
    from miaotui.engines import BuildOptions
    from miaotui.export.inspect_onnx import summarize_onnx
    from miaotui.stages import Build, Pipeline, run_build_stage, validate_engine

    config = resolve_config("lstm-sentiment")
    pipeline = Pipeline(config, lstm_work, progress=False)
    built = pipeline.run(Build(BuildOptions(backend="onnxruntime", precision=precision)))
    half = pipeline.result(precision)
    graph = lstm_work / f"model.{precision}.onnx"
    assert half.path == graph and summarize_onnx(graph).precision == precision
    assert half.details["agreement"]["top1_agreement"] >= (0.999 if precision == "fp16" else 0.99)
    source = json.loads((built.path.parent / (built.path.name + ".json")).read_text())
    assert source["precision"] == precision and source["onnx_file"] == str(graph.resolve())
    report = validate_engine(built.path, config, lstm_work, progress=False)
    assert report.passed, [c.sentence() for c in report.checks if not c.passed]
    # no warning but, on a busy machine, the one that says so (engines/timing.py)
    assert report.from_work_dir and not [w for w in report.warnings if "other processes took" not in w]
    assert report.precision == precision and report.bars["min_top1_agreement"] >= 0.99

    plan = pipeline.run(Build(BuildOptions(backend="tensorrt-rtx", precision=precision)))
    types = plan.details["network"]["tensorrt"]["by_output_type"]
    assert types.get("HALF", 0) > 10  # strongly typed: the graph's FP16 is the engine's
    assert ("INT8" in types) == (precision == "int8-fp16")
    again = Pipeline(config, lstm_work, progress=False)
    assert again.run(Build(BuildOptions(backend="onnxruntime", precision=precision))).skipped
    assert len(again.ran) >= 4 and all(r.skipped for r in again.ran)


def test_quantize_command_writes_the_fp16_graph_and_refuses_int8_options(router: Path):
    runner = CliRunner()
    work = router / "work"
    refused = runner.invoke(main, ["quantize", str(router / "config.toml"), "--precision", "fp16", "--method", "entropy",
                                   "--out", str(work)])
    assert refused.exit_code == 2 and "INT8 options" in refused.output and not work.exists()
    result = runner.invoke(main, ["quantize", str(router / "config.toml"), "--precision", "fp16", "--out", str(work)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "model.fp16.onnx" in result.stdout and "top-1 agreement with FP32" in result.stdout
    assert not (work / "model.int8.onnx").exists()  # fp16 needs no calibration
    model = onnx.load(str(work / "model.fp16.onnx"))
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.INT64, TensorProto.FLOAT]
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
