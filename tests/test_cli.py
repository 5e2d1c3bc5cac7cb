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
