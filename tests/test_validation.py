"""The parity gate: metrics with known answers, the verdict on real engines, failures named with their
metric, value and bar (exit 1), bad usage refused (exit 2), and the reports CI systems read."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import DATA, write_custom_config, write_data, error_lines
from onnx import helper, numpy_helper

from miaotui.cli import main
from miaotui.engines import BuildOptions, build_engine
from miaotui.models import resolve_config
from miaotui.validation.metrics import kl_divergence, output_metrics
from miaotui.validation.thresholds import DEFAULT_BARS, judge

# --- metrics on arrays whose answers are known ---------------------------------------------------


def test_identical_outputs_are_perfect():
    logits = np.array([[2.0, -1.0], [0.5, 0.25], [-3.0, 3.0]], np.float32)
    m = output_metrics("logits", logits, logits.copy(), labels=np.array([0, 0, 1]))
    assert (m.max_abs_error, m.mean_abs_error, m.max_rel_error) == (0.0, 0.0, 0.0)
    assert m.cosine == pytest.approx(1.0) and m.top1_agreement == 1.0 and m.kl_divergence == pytest.approx(0.0, abs=1e-12)
    assert m.reference_accuracy == m.engine_accuracy == 1.0 and m.accuracy_drop == 0.0
    assert all(check.passed for check in judge(m, DEFAULT_BARS["fp32"]))


def test_errors_are_relative_to_the_reference_and_agreement_counts_labels():
    reference = np.array([[2.0, 0.0], [0.0, 4.0]], np.float32)
    engine = np.array([[3.0, 0.0], [0.0, 4.0]], np.float32)
    m = output_metrics("logits", reference, engine)
    assert m.max_abs_error == pytest.approx(1.0) and m.mean_abs_error == pytest.approx(0.25)
    assert m.max_rel_error == pytest.approx(0.5)  # |3 - 2| / |2|, the reference's magnitude
    flipped = output_metrics("logits", reference, np.array([[0.0, 2.0], [0.0, 4.0]], np.float32), labels=np.array([0, 1]))
    assert flipped.top1_agreement == 0.5
    assert (flipped.reference_accuracy, flipped.engine_accuracy, flipped.accuracy_drop) == (1.0, 0.5, 0.5)


def test_kl_divergence_cosine_and_top_k_match_hand_computed_values():
    # p = (1/2, 1/2), q = (3/4, 1/4): KL(p || q) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
    assert kl_divergence(np.array([[0.0, 0.0]]), np.array([[math.log(3), 0.0]])) == pytest.approx(0.5 * math.log(4 / 3))
    orthogonal = output_metrics("x", np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), classifier=False)
    assert orthogonal.cosine == pytest.approx(0.0) and orthogonal.top1_agreement is None
    reference = np.array([[0.0, 1.0, 5.0], [9.0, 1.0, 0.0]])
    engine = np.array([[0.0, 6.0, 5.0], [9.0, 1.0, 0.0]])  # the first sample's class 2 is the engine's second
    m = output_metrics("logits", reference, engine, top_k=2)
    assert m.top1_agreement == 0.5 and m.topk_agreement == 1.0 and m.top_k == 2


def test_any_nan_fails_whatever_the_bars():
    reference = np.ones((4, 2), np.float32)
    engine = reference.copy()
    engine[2, 1] = np.nan
    m = output_metrics("logits", reference, engine)
    assert m.nan_count == 1 and math.isnan(m.max_abs_error)
    checks = judge(m, {})
    assert [c.passed for c in checks] == [False] and "nan_or_inf_count 1" in checks[0].sentence()
    assert not any(c.passed for c in judge(m, {"min_cosine": 0.0}) if c.metric == "cosine")  # NaN never clears a bar


# --- the gate on real engines ----------------------------------------------------------------------


def _gate(engine: Path, work: Path, *extra: str, config: str = "lstm-sentiment"):
    return CliRunner().invoke(main, ["validate", str(engine), "--config", config, "--out", str(work), *extra],
                              env={"COLUMNS": "200"})


def test_the_gate_passes_on_the_default_models_int8_engine(lstm_work: Path, tmp_path: Path):
    engine = lstm_work / "engines" / "lstm-sentiment.onnxruntime.int8.ort"
    junit = tmp_path / "parity.xml"
    result = _gate(engine, lstm_work, "--report", str(tmp_path / "reports"), "--junit", str(junit))
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.stdout and "top-1 agreement" in result.stdout
    report = json.loads((tmp_path / "reports" / "parity.json").read_text())
    assert report["passed"] and report["samples"] == 886 and report["from_work_dir"]
    assert report["engine_seconds"] > 0 and 0 <= report["cpu_busy_elsewhere"] <= 1  # the engine choice's timing
    (logits,) = report["outputs"]
    assert logits["top1_agreement"] >= 0.99 and logits["accuracy_drop"] <= 0.01 and logits["nan_count"] == 0
    cases = ET.parse(junit).getroot().findall("./testsuite/testcase")
    assert len(cases) == len(report["checks"]) >= 6 and not ET.parse(junit).getroot().findall(".//failure")
    assert "| top-1 agreement |" in (tmp_path / "reports" / "parity.md").read_text()
    assert (lstm_work / "reference.npz").is_file()
    again = _gate(engine, lstm_work)  # the reference is computed once per model and data
    assert again.exit_code == 0
    manifest = json.loads((lstm_work / "manifest.json").read_text())
    assert manifest["stages"]["reference"]["details"]["samples"] == 886


def _edited(source: Path, target: Path, edit) -> Path:
    model = onnx.load(str(source))
    edit(model)
    onnx.save(model, str(target))
    return target


def _initializer(model, name: str):
    return next(t for t in model.graph.initializer if t.name == name)


def _damage_head_scale(model) -> None:
    """One output channel of the head's INT8 weight dequantized with a negated scale."""
    tensor = _initializer(model, "fc.weight_scale")
    scale = numpy_helper.to_array(tensor).copy()
    scale[1] *= -1
    tensor.CopyFrom(numpy_helper.from_array(scale, tensor.name))


def _nan_output(model) -> None:
    output = model.graph.output[0]
    inner = output.name + "_before_nan"
    for node in model.graph.node:
        node.output[:] = [inner if name == output.name else name for name in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.array([np.nan], np.float32), "nan_constant"))
    model.graph.node.append(helper.make_node("Add", [inner, "nan_constant"], [output.name], name="add_nan"))


def _permute_labels(model) -> None:
    """The head's two classes swapped: a model that answers 'positive' for 'negative'."""
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    for name in gemm.input[1:]:
        tensor = _initializer(model, name)
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor)[::-1].copy(), tensor.name))


BROKEN = {
    "damaged quantization": ("model.int8.onnx", _damage_head_scale, "top1_agreement"),
    "returns NaN": ("model.int8.onnx", _nan_output, "nan_or_inf_count"),
    "labels permuted": ("model.opt.onnx", _permute_labels, "top1_agreement"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_the_gate_fails_with_exit_1_naming_the_metric(lstm_work: Path, tmp_path: Path, case: str):
    source, edit, metric = BROKEN[case]
    onnx_path = _edited(lstm_work / source, tmp_path / f"broken.{source}", edit)
    engine = tmp_path / "broken.ort"
    build_engine(onnx_path, engine, BuildOptions(), resolve_config("lstm-sentiment"))
    result = _gate(engine, lstm_work, "--report", str(tmp_path / "reports"))
    assert result.exit_code == 1, result.output
    last = error_lines(result.stderr)[-1]
    assert last.startswith("error: parity gate FAILED") and metric in last and "bar:" in last
    report = json.loads((tmp_path / "reports" / "parity.json").read_text())
    assert not report["passed"] and any(c["metric"] == metric and not c["passed"] for c in report["checks"])
    assert not report["from_work_dir"]  # said as a warning: this engine is not the work dir's
    failures = ET.parse(tmp_path / "reports" / "parity.xml").getroot().findall(".//testcase/failure")
    assert any(metric in f.get("message") for f in failures)


# --- bad usage: exit 2, one line -------------------------------------------------------------------


@pytest.fixture
def router_engine(custom_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The custom TicketRouter's fp32 onnxruntime engine, in its own work dir."""
    from miaotui.config import load_config
    from miaotui.stages import run_build_stage

    write_custom_config(custom_model_dir, DATA)
    write_data(custom_model_dir)
    config = load_config(custom_model_dir / "config.toml")
    built = run_build_stage(config, tmp_path / "router-work", BuildOptions(precision="fp32"), progress=False)
    return custom_model_dir, built.path


def _one_line_exit_2(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)
    assert message in lines[-1], lines
    assert "Traceback" not in result.output


def test_the_gate_passes_on_a_classifier_never_seen(router_engine):
    folder, engine = router_engine
    result = _gate(engine, engine.parent.parent, config=str(folder / "config.toml"))
    assert result.exit_code == 0, result.output  # fp32: the same arithmetic as PyTorch


def test_an_engine_and_a_config_that_do_not_belong_together(router_engine, lstm_work: Path):
    folder, engine = router_engine
    lstm_engine = lstm_work / "engines" / "lstm-sentiment.onnxruntime.int8.ort"
    _one_line_exit_2(_gate(lstm_engine, engine.parent.parent, config=str(folder / "config.toml")),
                     "the engine and the config do not belong together")


def test_validation_data_with_wrong_names_or_shapes(router_engine):
    folder, engine = router_engine
    rng = np.random.default_rng(0)
    np.savez(folder / "val.npz", token=rng.integers(0, 50, (8, 10)), features=rng.normal(size=(8, 4)).astype(np.float32))
    _one_line_exit_2(_gate(engine, engine.parent.parent, config=str(folder / "config.toml")), "val.npz")
    np.savez(folder / "val.npz", tokens=rng.integers(0, 50, (8, 10)), features=rng.normal(size=(8, 5)).astype(np.float32))
    _one_line_exit_2(_gate(engine, engine.parent.parent, config=str(folder / "config.toml")), "features")


def test_no_labels_where_the_config_asks_for_accuracy(router_engine):
    folder, engine = router_engine
    rng = np.random.default_rng(0)
    np.savez(folder / "val.npz", tokens=rng.integers(0, 50, (8, 10)), features=rng.normal(size=(8, 4)).astype(np.float32))
    write_custom_config(folder, DATA + "\n[validate.fp32]\nmax_accuracy_drop = 0.0\n")
    _one_line_exit_2(_gate(engine, engine.parent.parent, config=str(folder / "config.toml")),
                     "the accuracy bar needs labelled validation data")
    write_custom_config(folder, DATA + "\n[validate.fp32]\nmax_accuracy_drop = 0.0\nmin_top5_agreement = 0.9\n")
    _one_line_exit_2(_gate(engine, engine.parent.parent, config=str(folder / "config.toml")),
                     "validate.fp32.min_top5_agreement: unknown key")
