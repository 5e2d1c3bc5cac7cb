"""A hostile environment: a full disk, a read-only folder, a second run on the same work dir, a run
killed mid-stage. Each ends in one line and exit 2 (or waits), with nothing invalid under a final name."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

MIAOTUI = [sys.executable, "-m", "miaotui.cli"]


def _mount(*args: str) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    folder.mkdir(parents=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)):
        pytest.skip("mounting a small tmpfs needs root (the disk-full test)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextlib.contextmanager
def read_only(folder: Path):
    if not (_mount("--bind", str(folder), str(folder)) and _mount("-o", "remount,bind,ro", str(folder))):
        subprocess.run(["umount", str(folder)], capture_output=True)
        pytest.skip("a read-only bind mount needs root (the read-only test)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path: Path):
    with small_disk(tmp_path / "disk", "2m") as disk:  # model.onnx is 3.5 MB
        result = subprocess.run([*MIAOTUI, "export", "lstm-sentiment", "--out", str(disk / "work")],
                                capture_output=True, text=True)
        line = _one_error_line(result)
        assert "No space left on device" in line and str(disk / "work") in line
        leftovers = [p.relative_to(disk) for p in disk.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
        assert leftovers == [], leftovers


def test_a_read_only_work_dir_is_one_line_and_keeps_its_files(tmp_path: Path):
    work = tmp_path / "work"
    first = subprocess.run([*MIAOTUI, "export", "lstm-sentiment", "--out", str(work)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    with read_only(work):
        current = subprocess.run([*MIAOTUI, "export", "lstm-sentiment", "--out", str(work)], capture_output=True,
                                 text=True)
        assert current.returncode == 0, current.stderr[-2000:]  # nothing to write: the manifest says current
        forced = subprocess.run([*MIAOTUI, "export", "lstm-sentiment", "--out", str(work), "--force"],
                                capture_output=True, text=True)
        line = _one_error_line(forced)
        assert "Read-only file system" in line and str(work) in line
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before


def test_calibration_writes_nothing_beside_the_graph_it_reads(router: Path, tmp_path: Path):
    """ONNX Runtime's calibrator writes NAME-inferred.onnx beside the model it is given; in a
    read-only folder that failed before the graph was handed over as a link in a scratch folder."""
    from miaotui.config import load_config
    from miaotui.stages import run_optimize_stage, run_quantize_stage

    config = load_config(router / "config.toml")
    work = tmp_path / "work"
    run_optimize_stage(config, work)
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    shutil.copy(work / "model.opt.onnx", graphs / "model.opt.onnx")
    from miaotui.data.datasets import data_set, summarize
    from miaotui.export.calibration import METHOD_SETTINGS, CalibrationKey, CalibrationRequest, calibrate

    calibration = data_set(config, "calibration")
    key = CalibrationKey("x", summarize(calibration).fingerprint, 200, "minmax", "y", 0.5, "z")
    with read_only(graphs):
        result = calibrate(graphs / "model.opt.onnx", calibration.batches(), CalibrationRequest(key, ("scores",)),
                           progress=False)
    assert set(result.ranges) == {"scores"} and sorted(p.name for p in graphs.iterdir()) == ["model.opt.onnx"]
    assert run_quantize_stage(config, work, progress=False).path.is_file()
    assert not list(work.glob("*-inferred*"))


def test_a_second_run_waits_for_the_first_or_fails_at_once(tmp_path: Path):
    from miaotui.workdir import WorkDir

    work = WorkDir(tmp_path / "work")
    with work.lock():  # this process holds the work dir, as a run would
        refused = subprocess.run([*MIAOTUI, "export", "lstm-sentiment", "--out", str(work.root), "--no-wait"],
                                 capture_output=True, text=True)
        assert "another miaotui run is using this work dir" in _one_error_line(refused)
        waiting = subprocess.Popen([*MIAOTUI, "export", "lstm-sentiment", "--out", str(work.root)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        told = ""
        deadline = time.monotonic() + 120
        while "waiting for it" not in told and time.monotonic() < deadline:
            told += waiting.stderr.readline()
        assert "waiting for it" in told and waiting.poll() is None
        assert not work.exported.exists()  # it has written nothing while it waits
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err[-2000:]
    assert work.exported.is_file() and "export" in out


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recorded(work: Path) -> set[str]:
    import json

    try:
        return set(json.loads((work / "manifest.json").read_text())["stages"])
    except (OSError, ValueError, KeyError):
        return set()  # not written yet (it is only ever replaced whole)


def test_a_run_killed_inside_each_stage_recovers_with_the_same_graphs(tmp_path: Path, lstm_work: Path):
    """One work dir, one run after another, each SIGKILLed once the stage after the last one killed
    has its scratch folder (found by watching the work dir, not by timing): after each kill no file
    under its final name disagrees with the manifest; each next run removes the killed run's scratch
    folders and redoes the stage that was killed; the last run, uninterrupted, passes the gate with
    the graphs `make export` writes (the shared lstm_work), bit for bit."""
    import json

    command = [*MIAOTUI, "run", "lstm-sentiment", "--backend", "onnxruntime", "--out"]
    graphs = ("model.onnx", "model.opt.onnx", "model.int8.onnx")
    expected = {name: _sha256(lstm_work / name) for name in graphs}
    stages = ("export", "optimize", "quantize", "build:onnxruntime:int8")
    work = tmp_path / "work"
    killed, scratch = [], set()
    for index, stage in enumerate(stages):
        run = subprocess.Popen([*command, str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while run.poll() is None and time.monotonic() < deadline:
            done = _recorded(work)
            if set(stages[:index]) <= done and stage not in done and list(work.glob(".staging-*")):
                run.kill()
                killed.append(stage)
                break
            time.sleep(0.002)
        run.wait()
        assert killed[-1:] == [stage], f"the run got past {stage} before it could be killed there"
        manifest = json.loads((work / "manifest.json").read_text()) if (work / "manifest.json").exists() else {"stages": {}}
        for record in manifest["stages"].values():  # what the manifest says is there, is there, intact
            for name, digest in record["outputs"].items():
                assert _sha256(work / name) == digest, name
        assert stage not in manifest["stages"]
        for name in graphs[:index]:  # what this run redid after the last kill is what an uninterrupted run writes
            assert _sha256(work / name) == expected[name], name
        left = {folder.name for folder in work.glob(".staging-*")}
        assert not left & scratch, f"a killed run's scratch folders were not removed: {sorted(left & scratch)}"
        scratch = left
    again = subprocess.run([*command, str(work)], capture_output=True, text=True)
    assert again.returncode == 0 and "PASSED" in again.stdout, again.stderr[-2000:]
    assert {name: _sha256(work / name) for name in graphs} == expected
    assert not list(work.glob(".staging-*"))
    assert killed == list(stages)


def test_two_real_runs_on_one_work_dir_take_turns(tmp_path: Path):
    """Two `miaotui run` processes started together on one work dir take turns (the lock is held per
    pipeline run: stages, then the gate's reference): what one built the other finds current, every
    stage is produced once, the manifest agrees with the files, and both pass the gate."""
    import json

    work = tmp_path / "work"
    command = [*MIAOTUI, "run", "lstm-sentiment", "--backend", "onnxruntime", "--out", str(work)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in results]
    assert any("waiting for it" in err for _, err in results)
    # export, optimize, quantize and build ran once: the run that waited for them found them current
    assert max(out.count("cached") for out, _ in results) >= 4
    assert all("PASSED" in out for out, _ in results)
    manifest = json.loads((work / "manifest.json").read_text())
    assert {"export", "optimize", "quantize", "build:onnxruntime:int8", "reference"} <= set(manifest["stages"])
    for record in manifest["stages"].values():
        for name, digest in record["outputs"].items():
            assert _sha256(work / name) == digest, name
