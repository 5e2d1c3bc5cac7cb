"""The accuracy-budgeted search: a model the default rules quantize badly (one hidden channel 200x the
others: one per-tensor INT8 scale crushes the rest) fails the parity gate, and the search, told the
agreement it must keep, finds the node to keep in float and the engine passes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from miaotui.cli import main

OUTLIER_MODEL = '''
import torch
from torch import nn


class Outlier(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 3)

    def forward(self, features):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(features)))))


def build():
    torch.manual_seed(3)
    model = Outlier()
    with torch.no_grad():  # channel 0 of fc1's output 200x larger; fc2 reads it 200x smaller: same function
        model.fc1.weight[0] *= 200
        model.fc1.bias[0] *= 200
        model.fc2.weight[:, 0] /= 200
    return model
'''

CONFIG = """
name = "outlier"
[model]
factory = "outlier.py:build"
outputs = ["logits"]
labels = ["a", "b", "c"]
[inputs]
features = { dtype = "float32", shape = ["batch", 16], range = [-2.0, 2.0] }
[dims]
batch = { min = 1, opt = 8, max = 32 }
[data]
calibration = "calib.npz"
validation = "val.npz"
[quantize]
samples = 256
"""


@pytest.fixture(scope="module")
def outlier(tmp_path_factory) -> Path:
    import torch

    folder = tmp_path_factory.mktemp("outlier")
    (folder / "outlier.py").write_text(textwrap.dedent(OUTLIER_MODEL))
    (folder / "config.toml").write_text(CONFIG)
    namespace: dict = {}
    exec(compile(OUTLIER_MODEL, "outlier.py", "exec"), namespace)
    model = namespace["build"]().eval()
    rng = np.random.default_rng(0)
    calibration = rng.normal(0, 1, (640, 16)).astype(np.float32)
    validation = rng.normal(0, 1, (400, 16)).astype(np.float32)
    with torch.no_grad():
        labels = model(torch.from_numpy(validation)).argmax(1).numpy()
    np.savez(folder / "calib.npz", features=calibration)
    np.savez(folder / "val.npz", features=validation, labels=labels)
    return folder


def _build_and_gate(config, work: Path):
    from miaotui.engines import BuildOptions
    from miaotui.stages import run_build_stage
    from miaotui.stages import validate_engine

    built = run_build_stage(config, work, BuildOptions(backend="onnxruntime"), progress=False)
    return validate_engine(built.path, config, work, progress=False)


def test_the_search_rescues_a_model_the_rules_fail(outlier: Path):
    from miaotui.models import resolve_config

    work = outlier / "work"
    failed = _build_and_gate(resolve_config(outlier / "config.toml"), work)
    assert not failed.passed
    assert any(c.metric == "top1_agreement" and not c.passed for c in failed.checks)

    # The same model with a target in its config: the quantize stage reruns with the search.
    targeted = outlier / "targeted.toml"
    targeted.write_text(CONFIG.replace("samples = 256", "samples = 256\ntarget_top1_agreement = 0.995"))
    config = resolve_config(targeted)
    rescued = _build_and_gate(config, work)
    assert rescued.passed, [c.sentence() for c in rescued.checks if not c.passed]
    quantization = json.loads((work / "quantization.json").read_text())
    report = quantization["search"]
    ranking = [item["node"] for item in report["ranking"]]
    assert report["met"] and report["agreement"] >= 0.995
    assert "samples 256..639" in report["held_out"]  # not the ranges' samples, not the validation split
    fc2 = next(d["node"] for d in quantization["decisions"] if d["op_type"] == "Gemm" and d["reason"] == "search-float")
    assert ranking[0] == fc2 and report["kept_float"] == [fc2]  # the crushed input, found first and alone
    sqnr = {item["node"]: item["sqnr_db"] for item in report["ranking"]}
    assert sqnr[fc2] < min(v for k, v in sqnr.items() if k != fc2) - 10
    assert [s["kept_float"] for s in report["steps"]][:2] == [0, 3] and report["steps"][0]["met"] is False
    assert quantization["ops"]["quantized"] == 2
    macs = {item["node"]: item["macs"] for item in report["ranking"]}
    assert 0 < report["int8_macs_share"] < 1
    assert abs(report["int8_macs_share"] - (1 - macs[fc2] / sum(macs.values()))) < 1e-4  # what fc2 in float costs


def test_target_from_the_config_and_the_command_line(outlier: Path, tmp_path: Path):
    text = (outlier / "config.toml").read_text()
    bad = outlier / "bad.toml"
    bad.write_text(text.replace("samples = 256", "samples = 256\ntarget_top1_agreement = 1.5"))
    result = CliRunner().invoke(main, ["quantize", str(bad), "--out", str(tmp_path / "w")])
    assert result.exit_code == 2 and "quantize.target_top1_agreement" in result.output
    good = outlier / "target.toml"
    good.write_text(text.replace('name = "outlier"', 'name = "outlier-target"')
                    .replace("samples = 256", "samples = 256\ntarget_top1_agreement = 0.995"))
    result = CliRunner().invoke(main, ["quantize", str(good), "--out", str(tmp_path / "w")], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "search for >= 0.995: met with 1 kept in float" in result.stdout


def test_inspect_layers_shows_where_the_int8_model_drifts(outlier: Path, tmp_path: Path):
    from miaotui.stages import run_quantize_stage
    from miaotui.models import resolve_config

    config = resolve_config(outlier / "config.toml")
    work = tmp_path / "work"
    quantized = run_quantize_stage(config, work, progress=False)
    runner = CliRunner()
    refused = runner.invoke(main, ["inspect", "--layers", str(work / "model.opt.onnx")])
    assert refused.exit_code == 2 and "needs an INT8 one" in refused.output
    result = runner.invoke(main, ["inspect", "--layers", str(quantized.path), "--config", str(outlier / "config.toml"),
                                  "--samples", "100"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    layers = json.loads((work / "reports" / "layers.json").read_text())
    assert layers["samples"] == 100 and (work / "reports" / "layers.png").stat().st_size > 10_000
    gemms = [row for row in layers["layers"] if row["op_type"] == "Gemm"]
    assert [row["int8"] for row in gemms] == [True, True, True]
    fc1, fc2, head = (row["sqnr_db"] for row in gemms)
    assert fc2 < fc1 - 15 and head < fc1 - 15  # the drift starts at fc2, whose input scale is set by the outlier
    assert "lowest SQNR" in result.stdout
