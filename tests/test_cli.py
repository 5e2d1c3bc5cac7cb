from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from miaotui.cli import COMMANDS, main


def test_help_lists_every_command_of_the_design():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert set(COMMANDS) == set(main.commands)
    for command in COMMANDS:
        assert f"  {command} " in result.output


def test_console_script_exports_a_custom_model(custom_model_dir: Path, tmp_path: Path):
    """The installed `miaotui` entry point, in its own process, on a model it has never seen."""
    out = tmp_path / "work"
    exe = Path(sys.executable).with_name("miaotui")
    completed = subprocess.run(
        [str(exe), "export", str(custom_model_dir / "config.toml"), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert completed.returncode == 0, completed.stderr
    assert (out / "model.onnx").is_file()
    assert "batch=4, words=12" in completed.stdout
    assert "Traceback" not in completed.stderr and "torchvision" not in completed.stderr


def test_missing_config_file_is_exit_2(tmp_path: Path):
    result = CliRunner().invoke(main, ["export", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "nope.toml: config file does not exist" in result.stderr


def test_run_outside_a_terminal_prints_a_line_per_stage_and_no_bars_or_library_warnings(router: Path,
                                                                                        tmp_path: Path):
    """CI logs: each stage's start and end on a line of its own, no tqdm carriage returns, and a
    warning the model's own code raises (as torch's nested-tensor one does) kept out of the output."""
    model = router / "router.py"
    model.write_text(model.read_text().replace(
        "    def forward(self, tokens, features):\n",
        "    def forward(self, tokens, features):\n        import warnings\n"
        "        warnings.warn('nested tensors are a prototype', UserWarning)\n"))
    out = tmp_path / "work"
    import warnings

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, ["run", str(router / "config.toml"), "--out", str(out), "--backend",
                                           "onnxruntime"])
    assert result.exit_code == 0, result.output
    assert not [w for w in shown if "nested tensors" in str(w.message)]
    lines = result.stderr.splitlines()
    for stage in ("export", "optimize", "quantize", "build:onnxruntime:int8"):
        assert f"miaotui: {stage} ticket-router ..." in lines
        assert any(line.startswith(f"miaotui: {stage} ticket-router done in ") for line in lines), lines
    assert "miaotui: validate ticket-router ..." in lines
    assert "\r" not in result.stderr and "sample/s" not in result.stderr
    assert "nested tensors" not in result.output and "UserWarning" not in result.output

    again = CliRunner().invoke(main, ["run", str(router / "config.toml"), "--out", str(out), "--backend", "onnxruntime"])
    assert "miaotui: export ticket-router current (skipped)" in again.stderr.splitlines()


def test_bench_rows_carry_the_ratio_to_pytorch_and_few_calls_are_flagged():
    from miaotui.bench import unsteady
    from miaotui.bench.run import with_torch_ratios

    rows = with_torch_ratios([
        {"name": "pytorch", "kind": "torch", "batch": 8, "seq": 128, "p50_ms": 30.0, "calls": 40},
        {"name": "int8", "kind": "engine", "batch": 8, "seq": 128, "p50_ms": 10.0, "calls": 12},
        {"name": "int8", "kind": "engine", "batch": 1, "seq": 128, "p50_ms": 2.0, "calls": 400},
    ])
    assert rows[0]["vs_torch"] == 1.0 and rows[1]["vs_torch"] == 3.0 and "vs_torch" not in rows[2]
    assert unsteady(rows) == ["int8 batch 8 seq 128: p50 of only 12 calls; a longer --seconds gives a steadier figure"]


def test_synthetic_feeds_hold_a_padding_mask_of_ones_whatever_its_name():
    """The bench times every subject on all-real positions: a random 0/1 mask on an input not named
    attention_mask made torch's TransformerEncoder time other work (its nested-tensor path skips
    the masked half) than the engines did."""
    from miaotui.config import parse_config
    from miaotui.engines.metadata import TensorRange
    from miaotui.engines.shapes import synthetic_feed

    config = parse_config({"name": "m", "model": {"factory": "pkg.mod:build"},
                           "inputs": {"ids": {"dtype": "int64", "shape": ["batch", "seq"], "range": [0, 50]},
                                      "keep": {"dtype": "int64", "shape": ["batch", "seq"], "range": [0, 2],
                                               "padding_mask": True}},
                           "dims": {"batch": {"min": 1, "max": 8}, "seq": {"min": 1, "max": 64}}}, Path("m.toml"))
    ranges = [TensorRange(name, "int64", ("batch", "seq"), (1, 1), (8, 64), (8, 64)) for name in ("ids", "keep")]
    feed = synthetic_feed(ranges, "opt", config)
    assert (feed["keep"] == 1).all() and feed["ids"].max() > 1
