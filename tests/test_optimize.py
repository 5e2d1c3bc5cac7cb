from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from miaotui.cli import main
from miaotui.config import load_config
from miaotui.errors import CheckFailed
from miaotui.export import compare_onnx
from miaotui.stages import run_export_stage, run_optimize_stage
from miaotui.export.parity import parity_sizes

from tensorrt_judge import build_with_tensorrt_rtx


def _run(path: Path, feed: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_optimized_graph_answers_like_the_export_and_tensorrt_builds_it(custom_model_dir: Path, tmp_path: Path):
    config = load_config(custom_model_dir / "config.toml")
    work = tmp_path / "work"
    result = run_optimize_stage(config, work)
    assert result.path == work / "model.opt.onnx" and not result.skipped
    assert result.details["nodes_after"] <= result.details["nodes_before"]
    assert result.details["max_abs_diff"] <= 1e-5

    optimized = onnx.load(str(result.path))
    assert {n.domain for n in optimized.graph.node} <= {"", "ai.onnx"}
    assert [i.name for i in optimized.graph.input] == ["tokens", "features"]
    assert all(d.dim_param for d in optimized.graph.input[0].type.tensor_type.shape.dim)
    assert optimized.graph.value_info, "shape inference annotates intermediate tensors"

    rng = np.random.default_rng(5)
    feed = {"tokens": rng.integers(0, 50, (7, 19)), "features": rng.normal(size=(7, 4)).astype(np.float32)}
    np.testing.assert_allclose(_run(result.path, feed), _run(work / "model.onnx", feed), atol=1e-5, rtol=0)
    assert build_with_tensorrt_rtx(result.path, config) > 0


def test_optimize_is_skipped_until_model_onnx_changes(custom_model_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    config = load_config(custom_model_dir / "config.toml")
    work = tmp_path / "work"
    run_optimize_stage(config, work)
    assert run_optimize_stage(config, work).skipped
    assert not run_optimize_stage(config, work, force=True).skipped

    state = load_file(str(custom_model_dir / "router.safetensors"))
    state["head.bias"] = state["head.bias"] - 2.0
    save_file(state, str(custom_model_dir / "router.safetensors"))
    config = load_config(custom_model_dir / "config.toml")
    redone = run_optimize_stage(config, work)  # re-exports, then re-optimizes
    assert not redone.skipped
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["stages"]["optimize"]["inputs"]["model.onnx"] == manifest["stages"]["export"]["outputs"]["model.onnx"]


def test_comparison_catches_a_graph_that_answers_differently(custom_model_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    config = load_config(custom_model_dir / "config.toml")
    first = run_export_stage(config, tmp_path / "a").path
    state = load_file(str(custom_model_dir / "router.safetensors"))
    state["head.weight"] = state["head.weight"] * 1.0001
    save_file(state, str(custom_model_dir / "router.safetensors"))
    second = run_export_stage(load_config(custom_model_dir / "config.toml"), tmp_path / "b").path
    with pytest.raises(CheckFailed, match="differs from model.onnx"):
        compare_onnx(first, second, config, parity_sizes(config))


def test_large_optimized_models_keep_weights_external(custom_model_dir: Path, tmp_path: Path):
    config = load_config(custom_model_dir / "config.toml")
    result = run_optimize_stage(config, tmp_path / "work", external_data_threshold=1000)
    assert sorted(p.name for p in result.files) == ["model.opt.onnx", "model.opt.onnx.data"]
    feed = {"tokens": np.ones((2, 6), dtype=np.int64), "features": np.zeros((2, 4), dtype=np.float32)}
    np.testing.assert_allclose(_run(result.path, feed), _run(tmp_path / "work" / "model.onnx", feed), atol=1e-5)


def test_cli_optimize_runs_export_first(custom_model_dir: Path, tmp_path: Path):
    out = tmp_path / "work"
    result = CliRunner().invoke(main, ["optimize", str(custom_model_dir / "config.toml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").is_file() and (out / "model.opt.onnx").is_file()
    assert "optimize" in result.stdout and "nodes" in result.stdout
