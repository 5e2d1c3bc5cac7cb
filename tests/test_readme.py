"""The README's code blocks that claim to run, run as written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _section(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    return text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_bring_your_own_classifier_runs_as_written(tmp_path: Path):
    section = _section("## Bring your own classifier")
    files = [block for language in ("python", "toml") for block in _blocks(section, language)]
    assert len(files) == 3
    for block in files:
        name = block.splitlines()[0].removeprefix("# ").strip()  # each file's block starts with "# <file name>"
        (tmp_path / name).write_text(block, encoding="utf-8")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", COLUMNS="200")
    for command in _blocks(section, "bash")[0].splitlines():
        command = command.split("#", 1)[0].strip()
        result = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    work = tmp_path / "build" / "my-classifier"
    assert (work / "engines" / "my-classifier.onnxruntime.int8.ort").is_file()
    assert "PASSED" in result.stdout and (work / "reports" / "my-classifier.onnxruntime.int8" / "parity.xml").is_file()


def test_the_pipeline_example_runs_as_written(lstm_work: Path, tmp_path: Path):
    code = _blocks(_section("## Python API").split("### The pipeline", 1)[1], "python")[0]
    shutil.copytree(lstm_work, tmp_path / "build" / "lstm-sentiment")  # a copy: the shared work dir stays as it is
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["export", "optimize", "quantize", "build"]
    assert "nodes INT8" in lines[2] and "onnxruntime" in lines[3]
    assert lines[-1].startswith("True 0.99")
