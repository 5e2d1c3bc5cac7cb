"""The quantize stage on a classifier the project has never seen: QDQ that TensorRT builds, scales that
follow from the data, the calibration cache, and every kind of bad calibration data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import DATA, write_custom_config, write_data, error_lines
from onnx import numpy_helper
from tensorrt_judge import build_with_tensorrt_rtx

from miaotui.config import load_config
from miaotui.errors import CheckFailed, InputError
from miaotui.stages import quantize_options, run_quantize_stage
from miaotui.export.calibration import Calibration, CalibrationKey
from miaotui.export.quantize import check_qdq

def quantize(folder: Path, work: Path, **options):
    config = load_config(folder / "config.toml")
    return run_quantize_stage(config, work, quantize_options(config, **options), progress=False)


def test_custom_classifier_quantizes_to_qdq_that_tensorrt_builds(router: Path, tmp_path: Path):
    result = quantize(router, tmp_path / "work")
    work = tmp_path / "work"
    model = onnx.load(str(work / "model.int8.onnx"))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("DequantizeLinear") >= 3 and "QuantizeLinear" in ops
    assert not [node.domain for node in model.graph.node if node.domain not in ("", "ai.onnx")]

    report = json.loads((work / "quantization.json").read_text())
    decided = {d["op_type"]: d for d in report["decisions"] if d["op_type"] in ("Gather", "Gemm")}
    assert decided["Gather"]["quantized"] and decided["Gemm"]["quantized"]
    assert all(d["why"] for d in report["decisions"])
    assert result.details["qdq_check"]["weights"] == 3  # embedding, features_proj, head
    # Random weights, random data: still, INT8 of a 3-layer model must agree on most labels.
    assert result.details["agreement"]["samples"] == 96
    assert result.details["agreement"]["top1_agreement"] >= 0.9
    assert result.details["agreement"]["reference_accuracy"] is not None
    build_with_tensorrt_rtx(work / "model.int8.onnx", load_config(router / "config.toml"))


def test_symmetric_int8_everywhere_and_biases_stay_float(router: Path, tmp_path: Path):
    quantize(router, tmp_path / "work")
    model = onnx.load(str(tmp_path / "work" / "model.int8.onnx"))
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = initializers[node.input[2]]
            assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
        if node.op_type == "Gemm":
            assert initializers[node.input[2]].dtype == np.float32  # TensorRT rejects INT32 biases


def test_scale_check_catches_a_wrong_activation_or_weight_scale(router: Path, tmp_path: Path):
    work = tmp_path / "work"
    quantize(router, work)
    calibration_json = json.loads((work / "calibration.json").read_text())
    calibration = Calibration(CalibrationKey(**calibration_json["key"]),
                              {k: tuple(v) for k, v in calibration_json["ranges"].items()}, 0.0)
    float_model = onnx.load(str(work / "model.opt.onnx"))
    check = check_qdq(work / "model.int8.onnx", float_model, calibration)
    assert check.activations >= 2 and check.weights == 3

    for target in ("QuantizeLinear", "DequantizeLinear"):
        model = onnx.load(str(work / "model.int8.onnx"))
        node = next(n for n in model.graph.node if n.op_type == target)
        scale = next(i for i in model.graph.initializer if i.name == node.input[1])
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.02), scale.name))
        damaged = tmp_path / f"damaged-{target}.onnx"
        onnx.save(model, str(damaged))
        with pytest.raises(CheckFailed, match="scale"):
            check_qdq(damaged, float_model, calibration)

    # A range the quantizer did not use (calibration.json edited by hand) is caught too.
    name = next(iter(calibration.ranges))
    low, high = calibration.ranges[name]
    calibration.ranges[name] = (low * 2, high * 2)
    with pytest.raises(CheckFailed, match="calibrated range"):
        check_qdq(work / "model.int8.onnx", float_model, calibration)


def test_rerun_is_skipped_and_calibration_is_cached(router: Path, tmp_path: Path):
    work = tmp_path / "work"
    first = quantize(router, work)
    assert not first.skipped and not first.details["calibration"]["cached"]
    assert quantize(router, work).skipped

    head = next(d["node"] for d in json.loads((work / "quantization.json").read_text())["decisions"]
                if d["op_type"] == "Gemm" and d["quantized"])
    excluded = quantize(router, work, exclude=(head,))
    assert not excluded.skipped and excluded.details["calibration"]["cached"]
    report = json.loads((work / "quantization.json").read_text())
    assert next(d for d in report["decisions"] if d["node"] == head)["reason"] == "user-exclude"

    other_method = quantize(router, work, method="minmax")
    assert not other_method.details["calibration"]["cached"]
    assert json.loads((work / "calibration.json").read_text())["key"]["method"] == "minmax"

    write_data(router, seed=5)  # new data: calibrated again
    assert not quantize(router, work, method="minmax").details["calibration"]["cached"]


def test_calibration_reads_npz_in_batches_and_counts_samples(router: Path, tmp_path: Path):
    write_data(router, samples=150)
    result = quantize(router, tmp_path / "work", samples=100)
    assert result.details["calibration"]["samples"] == 100
    result = quantize(router, tmp_path / "other", samples=1000)
    assert result.details["calibration"]["samples"] == 150
    assert any("1000 samples asked for, the set has 150" in w for w in result.warnings)


BAD_DATA = {
    "empty": ({"tokens": np.zeros((0, 12), np.int64), "features": np.zeros((0, 4), np.float32)}, "set is empty"),
    "wrong-name": ({"features": None, "feature": np.zeros((200, 4), np.float32)}, "unknown array 'feature'"),
    "missing": ({"features": None}, "input 'features' is missing"),
    "dtype": ({"tokens": np.zeros((200, 12), np.int32)}, "input 'tokens': expected dtype int64, got int32"),
    "seq-too-long": ({"tokens": np.zeros((200, 41), np.int64)}, r"words=41 is outside \[dims\] words \(2..40\)"),
    "fixed-dim": ({"features": np.zeros((200, 5), np.float32)}, "axis 1 must be 4"),
    "rank": ({"features": np.zeros((200,), np.float32)}, "expected rank 2"),
    "nan": ({"features": np.full((200, 4), np.nan, np.float32)}, "batch 0 \(from sample 0\): input .features.: 64 NaN or Inf values"),
    "pickle": ({"tokens": np.array([object()] * 200, dtype=object)}, "Python objects"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_calibration_data_is_one_line_exit_2_and_nothing_written(router: Path, tmp_path: Path, case: str):
    edits, message = BAD_DATA[case]
    if case == "empty":
        np.savez(router / "calib.npz", **edits)
    elif case == "pickle":
        np.savez(router / "calib.npz", tokens=edits["tokens"], features=np.zeros((200, 4), np.float32))
    else:
        write_data(router, **edits)
    work = tmp_path / "work"
    result = run_cli("quantize", str(router / "config.toml"), "--out", str(work))
    assert result.returncode == 2, result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "calib.npz" in lines[0]
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not work.exists()  # the data is checked before any stage runs


def test_too_few_samples_is_an_error_for_histograms_and_a_warning_for_minmax(router: Path, tmp_path: Path):
    write_data(router, samples=8)
    with pytest.raises(InputError, match="entropy calibration needs at least 16"):
        quantize(router, tmp_path / "a", method="entropy")
    with pytest.raises(InputError, match=r"percentile calibration needs at least 16 \(add texts, or --method minmax\)"):
        quantize(router, tmp_path / "c")  # the default method
    result = quantize(router, tmp_path / "b", method="minmax")
    assert any("only 8 calibration samples" in w for w in result.warnings)


def test_missing_calibration_set_and_unmatched_patterns_are_input_errors(custom_model_dir: Path, router: Path, tmp_path: Path):
    with pytest.raises(InputError, match="--exclude nothing_like_this: matches no quantizable node"):
        quantize(router, tmp_path / "a", exclude=("nothing_like_this",))
    write_custom_config(custom_model_dir)  # no [data]
    with pytest.raises(InputError, match="data.calibration: missing"):
        quantize(custom_model_dir, tmp_path / "b")


def test_cli_quantize_prints_the_summary(router: Path, tmp_path: Path):
    result = run_cli("quantize", str(router / "config.toml"), "--out", str(tmp_path / "work"), "--method", "percentile",
                     "--samples", "64", "--exclude", "Gather")
    assert result.returncode == 0, result.stderr
    assert "model.int8.onnx" in result.stdout and "quantization.json" in result.stdout
    assert "percentile on 64 samples" in result.stdout and "top-1 agreement with FP32" in result.stdout
    assert "only 64 calibration samples" in result.stderr  # a warning, not an error
    report = json.loads((tmp_path / "work" / "quantization.json").read_text())
    gather = next(d for d in report["decisions"] if d["op_type"] == "Gather")
    assert not gather["quantized"] and gather["why"].endswith("(--exclude Gather)")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "miaotui.cli", *args], capture_output=True, text=True, env=env)


def test_config_quantize_table_is_the_default_and_the_command_line_adds_to_it(router: Path):
    custom_model_dir = router
    write_custom_config(custom_model_dir, DATA + '\n[quantize]\nmethod = "entropy"\nsamples = 300\nexclude = ["Gather"]\n')
    config = load_config(custom_model_dir / "config.toml")
    options = quantize_options(config)
    assert (options.method, options.samples, options.exclude) == ("entropy", 300, ("Gather",))
    options = quantize_options(config, method="minmax", samples=64, exclude=("node_head",))
    assert (options.method, options.samples, options.exclude) == ("minmax", 64, ("Gather", "node_head"))


OUTLIER_MODEL = '''
import torch
from torch import nn


class OutlierNet(nn.Module):
    """A LayerNorm with one channel 40x the others feeding a Linear: what BERT's LayerNorms do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.proj = nn.Linear(16, 64)
        self.norm = nn.LayerNorm(64)
        self.hidden = nn.Linear(64, 64)
        self.head = nn.Linear(64, 3)
        with torch.no_grad():
            self.norm.weight[7] = 40.0

    def forward(self, features):
        pooled = torch.relu(self.hidden(self.norm(self.proj(features)))).mean(dim=1)
        return self.head(pooled)


def build():
    return OutlierNet()
'''

OUTLIER_CONFIG = """
name = "outlier-net"
[model]
factory = "outlier.py:build"
[inputs]
features = { dtype = "float32", shape = ["batch", "seq", 16], range = [-1.0, 1.0] }
[dims]
batch = { min = 1, opt = 8, max = 16 }
seq = { min = 1, opt = 8, max = 16 }
[data]
calibration = "calib.npz"
validation = "val.npz"
"""


def fp32_and_int8_outputs(work: Path, validation: np.ndarray) -> list[np.ndarray]:
    """model.opt.onnx's and model.int8.onnx's outputs on `features` = validation, with ONNX Runtime."""
    import onnxruntime as ort

    return [ort.InferenceSession(str(work / name), providers=["CPUExecutionProvider"]).run(None, {"features": validation})[0]
            for name in ("model.opt.onnx", "model.int8.onnx")]


def model_folder(folder: Path, source: str, config: str, seed: int, validation_samples: int = 256) -> np.ndarray:
    """`folder` with outlier.py (`source`), config.toml and random (N, 8, 16) features: 256 calibration
    samples and `validation_samples` validation ones, which it returns."""
    folder.mkdir()
    (folder / "outlier.py").write_text(source)
    (folder / "config.toml").write_text(config)
    rng = np.random.default_rng(seed)
    np.savez(folder / "calib.npz", features=rng.normal(size=(256, 8, 16)).astype(np.float32))
    validation = rng.normal(size=(validation_samples, 8, 16)).astype(np.float32)
    np.savez(folder / "val.npz", features=validation)
    return validation


def test_smoothing_moves_an_outlier_channel_into_the_weights(tmp_path: Path):
    folder = tmp_path / "outlier"
    validation = model_folder(folder, OUTLIER_MODEL, OUTLIER_CONFIG, seed=0)

    errors = {}
    for alpha in (0.0, 0.5):
        work = tmp_path / f"work-{alpha}"
        quantize(folder, work, smooth_alpha=alpha)
        smoothed = json.loads((work / "quantization.json").read_text())["smoothed_inputs"]
        assert len(smoothed) == (2 if alpha else 0)  # the inputs of `proj` and of `hidden` (the LayerNorm's)
        outputs = fp32_and_int8_outputs(work, validation)
        errors[alpha] = float(np.abs(outputs[0] - outputs[1]).mean())
        if alpha:
            assert max(s["max_factor"] for s in smoothed) > 10
            assert json.loads((work / "calibration.json").read_text())["channel_ranges"]
            build_with_tensorrt_rtx(work / "model.int8.onnx", load_config(folder / "config.toml"))
    # One per-tensor scale set by the outlier crushes the other 63 channels; smoothed, they survive.
    assert errors[0.5] < 0.5 * errors[0.0], errors


FFN_MODEL = '''
import torch
from torch import nn


class FeedForward(nn.Module):
    """A transformer FFN: GELU's one-sided outputs, two channels 30x the rest, into the down-projection."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.up = nn.Linear(16, 64)
        self.down = nn.Linear(64, 16)
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            self.up.weight[[3, 40]] *= 30.0

    def forward(self, features):
        return self.head(self.down(nn.functional.gelu(self.up(features))).mean(dim=1))


def build():
    return FeedForward()
'''

FFN_CONFIG = OUTLIER_CONFIG.replace("outlier-net", "ffn-net")


def test_one_sided_gelu_outputs_are_shifted_then_quantized(tmp_path: Path):
    from miaotui.export.smoothing import COMPENSATION_SUFFIX

    folder = tmp_path / "ffn"
    validation = model_folder(folder, FFN_MODEL, FFN_CONFIG, seed=1)

    def int8_error(work: Path) -> float:
        outputs = fp32_and_int8_outputs(work, validation)
        return float(np.abs(outputs[0] - outputs[1]).mean())

    # Bias correction off: it moves the compensation by the node's mean error (tested below).
    shifted_work = tmp_path / "shifted"
    quantize(folder, shifted_work, bias_correction=False)
    report = json.loads((shifted_work / "quantization.json").read_text())
    down = next(d for d in report["decisions"] if d["reason"] in ("int8-shifted", "rule-post-gelu"))
    assert down["quantized"] and down["reason"] == "int8-shifted"
    shifted = [s for s in report["smoothed_inputs"] if s["shifted"]]
    assert len(shifted) == 1 and shifted[0]["matmuls"] == [down["node"]] and shifted[0]["alpha"] == 0.85

    # The compensation after the INT8 MatMul is (z / s) @ the dequantized INT8 weight, not the float one.
    model = onnx.load(str(shifted_work / "model.int8.onnx"))
    arrays = {init.name: numpy_helper.to_array(init).astype(np.float64) for init in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    add = next(node for node in model.graph.node if node.name.endswith(COMPENSATION_SUFFIX))
    matmul = producers[add.input[0]]
    weight_dq = producers[matmul.input[1]]
    assert weight_dq.op_type == "DequantizeLinear"
    dequantized = arrays[weight_dq.input[0]] * arrays[weight_dq.input[1]]
    mul = producers[producers[producers[matmul.input[0]].input[0]].input[0]]
    sub = producers[mul.input[0]]
    assert (mul.op_type, sub.op_type) == ("Mul", "Sub")
    expected = (arrays[sub.input[1]] * arrays[mul.input[1]]) @ dequantized
    np.testing.assert_allclose(arrays[add.input[1]], expected, rtol=1e-5, atol=1e-6)
    build_with_tensorrt_rtx(shifted_work / "model.int8.onnx", load_config(folder / "config.toml"))

    # The same node in INT8 unsmoothed (smoothing off, --include) drifts much further.
    plain_work = tmp_path / "plain"
    quantize(folder, plain_work, smooth_alpha=0.0, include=(down["node"],), bias_correction=False)
    assert not json.loads((plain_work / "quantization.json").read_text())["smoothed_inputs"]
    assert int8_error(shifted_work) < 0.5 * int8_error(plain_work), (int8_error(shifted_work), int8_error(plain_work))

    # A shifted input's range comes from its channel ranges whatever the method: entropy's threshold
    # on the folded |x| histogram had cut its tail (MiniLM's agreement fell to 0.57).
    def shifted_scale(work: Path) -> float:
        graph = onnx.load(str(work / "model.int8.onnx")).graph
        values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        return next(float(values[node.input[1]]) for node in graph.node
                    if node.op_type == "QuantizeLinear" and node.input[0] == mul.output[0])

    entropy_work = tmp_path / "entropy"
    quantize(folder, entropy_work, method="entropy", bias_correction=False)
    assert shifted_scale(entropy_work) == pytest.approx(shifted_scale(shifted_work), rel=1e-6)

    # With smoothing off and no --include, the rules keep it in float.
    off_work = tmp_path / "off"
    quantize(folder, off_work, smooth_alpha=0.0)
    decided = {d["node"]: d for d in json.loads((off_work / "quantization.json").read_text())["decisions"]}
    assert decided[down["node"]]["reason"] == "rule-post-gelu" and not decided[down["node"]]["quantized"]


def test_a_gelu_channel_far_above_the_rest_is_split_into_copies(tmp_path: Path, monkeypatch):
    folder = tmp_path / "ffn"
    validation = model_folder(folder, FFN_MODEL, FFN_CONFIG, seed=1)
    split_work, whole_work = tmp_path / "split", tmp_path / "whole"
    quantize(folder, split_work, bias_correction=False)
    # `up` in float for the error comparison below: its own INT8 error on channels 3 and 40 (30x) would
    # hide the down-projection's.
    up = next(d["node"] for d in json.loads((split_work / "quantization.json").read_text())["decisions"]
              if d["op_type"] == "MatMul" and d["reason"] == "int8")
    quantize(folder, split_work, bias_correction=False, exclude=(up,))
    with monkeypatch.context() as patch:
        patch.setattr("miaotui.export.smoothing.SPLIT_MEDIANS", float("inf"))
        quantize(folder, whole_work, bias_correction=False, exclude=(up,))

    # GELU channels 3 and 40 (30x the others) are split; each copy is a column more of `up`, a row more of `down`.
    smoothed = json.loads((split_work / "quantization.json").read_text())["smoothed_inputs"]
    shifted = next(s for s in smoothed if s["shifted"])
    assert shifted["split"] == [3, 40] and min(shifted["copies"]) >= 2, shifted
    extra = sum(shifted["copies"]) - 2
    graphs = {name: onnx.load(str(work / "model.int8.onnx")) for name, work in (("split", split_work), ("whole", whole_work))}
    assert [n.op_type for n in graphs["split"].graph.node] == [n.op_type for n in graphs["whole"].graph.node]  # no new op
    for name, graph in graphs.items():
        width = 64 + extra + (-(64 + extra) % 64) if name == "split" else 64  # zero channels keep it a multiple of 64
        shapes = {tuple(i.dims) for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2}
        assert (width, 16) in shapes, (name, shapes)  # `up` is float here, `down` INT8
    # The step of the down-projection's input scale is what the copies refine.
    scales = {}
    for name, graph in graphs.items():
        values = {init.name: numpy_helper.to_array(init) for init in graph.graph.initializer}
        smoothed_input = next(s["tensor"] for s in smoothed if s["shifted"]) + "_smoothed"
        scales[name] = next(float(values[n.input[1]]) for n in graph.graph.node
                            if n.op_type == "QuantizeLinear" and n.input[0] == smoothed_input)
    assert scales["split"] < 0.75 * scales["whole"], scales
    build_with_tensorrt_rtx(split_work / "model.int8.onnx", load_config(folder / "config.toml"))

    # The down-projection's output (before the pooling) drifts less from FP32.
    def down_error(work: Path) -> float:
        import onnxruntime as ort

        outputs = []
        for file in ("model.opt.onnx", "model.int8.onnx"):
            model = onnx.load(str(work / file))
            pooled = next(n.input[0] for n in model.graph.node if n.op_type == "ReduceMean")
            model.graph.output.append(onnx.helper.make_tensor_value_info(pooled, onnx.TensorProto.FLOAT, None))
            session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            outputs.append(session.run([pooled], {"features": validation})[0])
        return float(np.abs(outputs[0] - outputs[1]).mean())

    assert down_error(split_work) < 0.9 * down_error(whole_work), (down_error(split_work), down_error(whole_work))


def test_bias_correction_removes_the_mean_error_and_changes_only_biases(tmp_path: Path):
    folder = tmp_path / "ffn"
    validation = model_folder(folder, FFN_MODEL, FFN_CONFIG, seed=2, validation_samples=512)

    works = {on: tmp_path / ("corrected" if on else "plain") for on in (True, False)}
    reports = {on: quantize(folder, work, bias_correction=on).details for on, work in works.items()}
    assert reports[False]["bias_correction"]["nodes"] == 0
    corrected = reports[True]["bias_correction"]
    assert (corrected["nodes"], corrected["samples"]) == (3, 256) and corrected["max_rms"] > 0  # up, down, head
    models = {on: onnx.load(str(work / "model.int8.onnx")) for on, work in works.items()}
    assert [n.op_type for n in models[True].graph.node] == [n.op_type for n in models[False].graph.node]

    # Only the recorded biases moved, each by the recorded amount.
    recorded = {c["bias"]: c for c in json.loads((works[True] / "quantization.json").read_text())["bias_corrections"]}
    arrays = {on: {i.name: numpy_helper.to_array(i).astype(np.float64) for i in m.graph.initializer}
              for on, m in models.items()}
    moved = {name for name in arrays[True] if not np.array_equal(arrays[True][name], arrays[False][name])}
    assert moved == set(recorded)
    for name, correction in recorded.items():
        shift = arrays[False][name] - arrays[True][name]
        assert np.sqrt(np.mean(shift**2)) == pytest.approx(correction["rms"], rel=1e-3, abs=1e-6)

    # On held-out data the INT8 logits' mean offset from FP32 (what flips labels one way) shrinks.
    def mean_offset(work: Path) -> float:
        outputs = fp32_and_int8_outputs(work, validation)
        return float(np.abs((outputs[1] - outputs[0]).mean(axis=0)).max())

    assert mean_offset(works[True]) < 0.5 * mean_offset(works[False]), (mean_offset(works[True]), mean_offset(works[False]))


def test_real_positions_skip_padding_in_both_layouts():
    from miaotui.export.node_errors import real_positions

    mask = np.array([[1, 1, 0], [1, 0, 0]])
    tokens = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (batch, sequence, channels)
    np.testing.assert_array_equal(real_positions(tokens, mask), tokens[[0, 0, 1], [0, 1, 0]])
    heads = np.arange(2 * 5 * 3 * 4, dtype=np.float32).reshape(2, 5, 3, 4)  # (batch, heads, sequence, depth)
    kept = real_positions(heads, mask)
    assert kept.shape == (3 * 5, 4)
    np.testing.assert_array_equal(kept[:5], heads[0, :, 0])
    np.testing.assert_array_equal(real_positions(tokens, None), tokens.reshape(-1, 4))
    pooled = np.ones((2, 4))  # no sequence axis: every row counts
    assert real_positions(pooled, mask).shape == (2, 4)


def test_calibration_set_from_the_command_line_replaces_the_configs(router: Path, tmp_path: Path):
    other = tmp_path / "other.npz"
    rng = np.random.default_rng(9)
    np.savez(other, tokens=rng.integers(0, 50, (40, 30), dtype=np.int64),
             features=rng.uniform(-2, 2, (40, 4)).astype(np.float32))
    result = quantize(router, tmp_path / "work", calibration=str(other))
    assert result.details["calibration"]["samples"] == 40 and "other.npz" in result.details["calibration"]["set"]
    with pytest.raises(InputError, match="missing.npz: calibration data file does not exist"):
        quantize(router, tmp_path / "work", calibration=str(tmp_path / "missing.npz"))


def test_node_errors_count_only_real_tokens():
    """A node's own error (what the search ranks and bias correction removes) over real positions:
    padded positions hold values far outside the calibrated range and must not count."""
    from onnx import TensorProto, helper

    from miaotui.export.node_errors import node_errors

    rng = np.random.default_rng(4)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    scale, weight_scale = np.float32(0.05), (np.abs(weight).max(axis=0) / 127).astype(np.float32)
    weight_int8 = np.round(weight / weight_scale).astype(np.int8)

    def graph(int8: bool):
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 4]),
                  helper.make_tensor_value_info("mask", TensorProto.INT64, ["b", "s"])]
        nodes = [helper.make_node("Unsqueeze", ["mask", "axis"], ["mask3"]),
                 helper.make_node("Cast", ["mask3"], ["maskf"], to=TensorProto.FLOAT)]
        initializers = [numpy_helper.from_array(np.array([-1], np.int64), "axis")]
        if int8:
            nodes += [helper.make_node("QuantizeLinear", ["x", "s_x", "z"], ["xq"]),
                      helper.make_node("DequantizeLinear", ["xq", "s_x", "z"], ["xd"]),
                      helper.make_node("DequantizeLinear", ["w_q", "s_w", "z_w"], ["wd"], axis=1),
                      helper.make_node("MatMul", ["xd", "wd"], ["y"], name="proj")]
            initializers += [numpy_helper.from_array(np.array(scale), "s_x"), numpy_helper.from_array(np.int8(0), "z"),
                             numpy_helper.from_array(weight_int8, "w_q"), numpy_helper.from_array(weight_scale, "s_w"),
                             numpy_helper.from_array(np.zeros(3, np.int8), "z_w")]
        else:
            nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"))
            initializers.append(numpy_helper.from_array(weight, "w"))
        nodes.append(helper.make_node("Mul", ["y", "maskf"], ["out"]))
        output = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", 3])
        model = helper.make_model(helper.make_graph(nodes, "g", inputs, [output], initializers),
                                  opset_imports=[helper.make_opsetid("", 20)])
        model.ir_version = 10
        return model

    x = rng.uniform(-3, 3, size=(5, 6, 4)).astype(np.float32)
    mask = np.ones((5, 6), np.int64)
    mask[:, 4:] = 0
    x[:, 4:] = 500.0  # padding: saturates the INT8 grid
    feed = {"x": x, "mask": mask}
    masked = node_errors(graph(False), graph(True), ["proj"], [feed], "mask")["proj"]
    everything = node_errors(graph(False), graph(True), ["proj"], [feed])["proj"]
    assert masked.positions == 20 and everything.positions == 30

    real = x[:, :4].reshape(-1, 4)
    fake = np.clip(np.rint(real / scale), -128, 127) * scale
    expected_error = fake @ (weight_int8.astype(np.float32) * weight_scale) - real @ weight
    np.testing.assert_allclose(masked.mean_error, expected_error.mean(axis=0), rtol=1e-4, atol=1e-6)
    assert masked.noise == pytest.approx(float(np.sum(expected_error.astype(np.float64) ** 2)), rel=1e-4)
    assert everything.noise > 100 * masked.noise  # the padded rows would have dominated
