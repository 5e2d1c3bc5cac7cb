from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from miaotui.config import load_config
from miaotui.errors import CheckFailed
from miaotui.export import ExportOptions, check_parity
from miaotui.stages import run_export_stage
from miaotui.models.loading import load_model

from conftest import write_custom_config


def _inputs(batch: int, words: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "tokens": rng.integers(0, 50, (batch, words), dtype=np.int64),
        "features": rng.normal(0, 1, (batch, 4)).astype(np.float32),
    }


def test_custom_classifier_exports_and_matches_torch(custom_model_dir: Path, tmp_path: Path):
    config = load_config(custom_model_dir / "config.toml")
    result = run_export_stage(config, tmp_path / "work")
    assert not result.skipped and len(result.parity) == 2 and all(p.passed for p in result.parity)

    graph = onnx.load(str(result.onnx_path))
    onnx.checker.check_model(graph, full_check=True)
    assert [i.name for i in graph.graph.input] == ["tokens", "features"]
    assert [o.name for o in graph.graph.output] == ["scores"]
    assert {o.domain or "ai.onnx": o.version for o in graph.opset_import}["ai.onnx"] == 20
    tokens_dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in tokens_dims), "batch and words must stay dynamic"
    assert graph.graph.input[1].type.tensor_type.shape.dim[1].dim_value == 4

    # Independently of the stage's own check: batch 1 and batch 7 with different sequence lengths.
    model = load_model(config)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    for batch, words, seed in ((1, 5, 0), (7, 33, 1)):
        feed = _inputs(batch, words, seed)
        with torch.inference_mode():
            expected = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
        (actual,) = session.run(None, feed)
        assert actual.shape == (batch, 3)
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)

    work = tmp_path / "work"
    assert sorted(p.name for p in work.iterdir()) == ["config.toml", "manifest.json", "model.onnx"]
    manifest = json.loads((work / "manifest.json").read_text())
    stage = manifest["stages"]["export"]
    assert set(stage["inputs"]) == {"config", "factory", "checkpoint"}
    assert stage["tool_versions"]["torch"] == torch.__version__
    assert load_config(work / "config.toml").dims == config.dims  # the resolved config reloads


def test_export_is_skipped_when_nothing_changed_and_redone_when_weights_change(custom_model_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    config = load_config(custom_model_dir / "config.toml")
    work = tmp_path / "work"
    first = run_export_stage(config, work)
    first_sha = json.loads((work / "manifest.json").read_text())["stages"]["export"]["outputs"]["model.onnx"]

    again = run_export_stage(config, work)
    assert again.skipped and again.parity == first.parity

    state = load_file(str(custom_model_dir / "router.safetensors"))
    state["head.bias"] = state["head.bias"] + 1.0
    save_file(state, str(custom_model_dir / "router.safetensors"))
    changed = run_export_stage(load_config(custom_model_dir / "config.toml"), work)
    assert not changed.skipped
    assert json.loads((work / "manifest.json").read_text())["stages"]["export"]["outputs"]["model.onnx"] != first_sha

    (work / "model.onnx").write_bytes(b"damaged")  # an output changed behind the manifest's back
    assert not run_export_stage(config, work).skipped


def test_large_models_use_external_data(custom_model_dir: Path, tmp_path: Path):
    config = load_config(custom_model_dir / "config.toml")
    work = tmp_path / "work"
    result = run_export_stage(config, work, ExportOptions(external_data_threshold=1000))
    names = sorted(p.name for p in result.files)
    assert names == ["model.onnx", "model.onnx.data"]
    header = onnx.load(str(work / "model.onnx"), load_external_data=False)
    external = [t.name for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "weights must live in model.onnx.data"
    feed = _inputs(3, 9, 2)
    (with_data,) = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)

    inline = run_export_stage(config, work, force=True)  # small again: the stale data file goes
    assert [p.name for p in inline.files] == ["model.onnx"] and not (work / "model.onnx.data").exists()
    (inline_out,) = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_array_equal(with_data, inline_out)


STATEFUL_MODEL = '''
import torch
from torch import nn

class Drifting(nn.Module):
    """Python-side state: the traced graph freezes it, eager PyTorch keeps changing it."""
    def __init__(self):
        super().__init__()
        self.scale = 1.0
        self.head = nn.Linear(4, 3)
    def forward(self, tokens, features):
        self.scale += 1.0
        return self.head(features) * self.scale + tokens.float().mean(dim=1, keepdim=True)

def build():
    return Drifting()
'''


def test_export_that_differs_from_torch_fails_and_leaves_nothing(custom_model_dir: Path, tmp_path: Path):
    (custom_model_dir / "drifting.py").write_text(STATEFUL_MODEL)
    text = (custom_model_dir / "config.toml").read_text()
    text = text.replace("router.py", "drifting.py").replace('checkpoint = "router.safetensors"\n', "")
    config = load_config(write_custom_config(custom_model_dir, text=text))
    work = tmp_path / "work"
    with pytest.raises(CheckFailed, match="ONNX Runtime differs from PyTorch"):
        run_export_stage(config, work)
    assert not work.exists()

    work.mkdir()
    (work / "notes.txt").write_text("mine")
    with pytest.raises(CheckFailed):
        run_export_stage(config, work)
    assert sorted(os.listdir(work)) == ["notes.txt"]  # no model.onnx, no staging folder


def test_parity_check_catches_a_different_model(custom_model_dir: Path, tmp_path: Path):
    config = load_config(custom_model_dir / "config.toml")
    result = run_export_stage(config, tmp_path / "work")
    other = load_model(config)
    with torch.no_grad():
        other.head.weight.mul_(1.001)  # a 0.1% change in one layer
    with pytest.raises(CheckFailed, match="output scores max"):
        check_parity(other, config, result.onnx_path)


def test_pt_checkpoint_is_read_weights_only(custom_model_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file

    state = load_file(str(custom_model_dir / "router.safetensors"))
    torch.save({"state_dict": state}, custom_model_dir / "router.pt")
    text = (custom_model_dir / "config.toml").read_text().replace("router.safetensors", "router.pt")
    config = load_config(write_custom_config(custom_model_dir, text=text))
    model = load_model(config)
    torch.testing.assert_close(model.head.weight, state["head.weight"])
    assert all(p.passed for p in run_export_stage(config, tmp_path / "work", model=model).parity)


def test_a_builtin_models_data_files_key_its_export(tmp_path: Path):
    """Weights that live beside a package factory (the built-in models) must make the export stale."""
    import shutil
    import sys

    package = tmp_path / "pkg" / "tinyclf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import torch\nfrom pathlib import Path\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.fc = torch.nn.Linear(3, 2)\n"
        "    def forward(self, x):\n        return self.fc(x)\n"
        "def build():\n    m = M()\n"
        "    scale = float((Path(__file__).parent / 'scale.txt').read_text())\n"
        "    torch.nn.init.constant_(m.fc.weight, scale)\n    return m\n"
    )
    (package / "scale.txt").write_text("0.5")
    config_path = tmp_path / "config.toml"
    config_path.write_text(
        'name = "tiny"\n[model]\nfactory = "tinyclf:build"\n'
        '[inputs]\nx = { dtype = "float32", shape = ["batch", 3] }\n[dims]\nbatch = { min = 1, opt = 2, max = 8 }\n'
    )
    sys.path.insert(0, str(tmp_path / "pkg"))
    try:
        config = load_config(config_path)
        assert not run_export_stage(config, tmp_path / "work").skipped
        assert run_export_stage(config, tmp_path / "work").skipped
        (package / "scale.txt").write_text("0.25")
        assert not run_export_stage(config, tmp_path / "work").skipped
    finally:
        sys.path.remove(str(tmp_path / "pkg"))
        sys.modules.pop("tinyclf", None)
        shutil.rmtree(package)
