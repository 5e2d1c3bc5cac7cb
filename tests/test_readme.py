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


def _run_commands(block: str, folder: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", COLUMNS="200")
    for command in block.splitlines():
        command = command.split("#", 1)[0].strip()
        result = subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_hugging_face_folder_and_csv_run_as_written(tmp_path: Path):
    """The README's three commands on a small checkpoint (my-model/) and corpus CSVs shaped like its example."""
    import csv

    from miaotui.data.corpus import LABELS, load_split
    from miaotui.models.huggingface_tiny import save_checkpoint

    section = _section("## Bring your own classifier").split("### Your own module", 1)[0]
    example = _blocks(section, "csv")[0].splitlines()
    assert example[0] == "text,label" and example[1].endswith(",positive")
    save_checkpoint(tmp_path / "my-model", "bert", [e.text for e in load_split("train")[:3000]], vocab_size=300)
    for name, split in (("calibration.csv", "calibration"), ("validation.csv", "validation")):
        with (tmp_path / name).open("w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["text", "label"])
            writer.writerows([e.text, LABELS[e.label]] for e in load_split(split)[:200])
    commands = _blocks(section, "bash")[0]
    result = _run_commands(commands, tmp_path)
    assert "│ 物流很快，包装完好 │ " in result.stdout  # predict's table: the text, then its label
    assert result.stdout.split("│ 物流很快，包装完好 │ ", 1)[1].split()[0] in LABELS
    work = tmp_path / "build" / "my-model"
    assert (work / "engines" / "my-model.onnxruntime.int8.ort").is_file()
    assert (work / "reports" / "my-model.onnxruntime.int8" / "parity.json").is_file()


def test_bring_your_own_classifier_runs_as_written(tmp_path: Path):
    section = _section("## Bring your own classifier").split("### Your own module", 1)[1]
    files = [block for language in ("python", "toml") for block in _blocks(section, language)]
    assert len(files) == 3
    for block in files:
        name = block.splitlines()[0].removeprefix("# ").strip()  # each file's block starts with "# <file name>"
        (tmp_path / name).write_text(block, encoding="utf-8")
    result = _run_commands(_blocks(section, "bash")[0], tmp_path)
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
    passed, agreement = lines[-1].split()
    assert passed == "True" and float(agreement) >= 0.99
