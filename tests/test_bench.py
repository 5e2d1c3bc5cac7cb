"""miaotui bench: each subject in its own process, latency percentiles and throughput, three reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "miaotui.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, COLUMNS="200"))


def test_bench_times_an_engine_and_the_pytorch_model_and_writes_reports(lstm_work: Path, tmp_path: Path):
    engine = lstm_work / "engines" / "lstm-sentiment.onnxruntime.int8.ort"
    result = run_cli("bench", str(engine), "--torch", "lstm-sentiment", "--batch", "1,4", "--seq", "8,300",
                     "--threads", "1", "--seconds", "0.2", "--report", str(tmp_path))
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["threads"] == 1 and len(data["rows"]) == 8  # 2 subjects x 2 batches x 2 sequence lengths
    timed = [row for row in data["rows"] if "p50_ms" in row]
    assert {row["name"] for row in timed} == {"pytorch fp32 eager", "onnxruntime int8 (lstm-sentiment.onnxruntime.int8.ort)"}
    for row in timed:
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["calls"] >= 10
        assert row["samples_per_s"] > 0
    skipped = [row for row in data["rows"] if "skipped" in row]
    assert {(row["seq"]) for row in skipped} == {300}  # beyond the seq max of 256: said, not timed
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| pytorch fp32 eager | 4 | 8 |" in (tmp_path / "bench.md").read_text()
    assert "samples/s" in result.stdout


def test_bench_interleaved_times_every_subject_in_each_round(lstm_work: Path, tmp_path: Path):
    """--rounds 3: both subjects loaded at once and timed in three alternating rounds; each row's
    p50 is over every round's calls, its round_p50_ms holds each round's own, and a shape outside
    the engine's range is said, not timed."""
    engine = lstm_work / "engines" / "lstm-sentiment.onnxruntime.int8.ort"
    result = run_cli("bench", str(engine), "--torch", "lstm-sentiment", "--batch", "2", "--seq", "16,300",
                     "--threads", "1", "--seconds", "0.6", "--rounds", "3", "--report", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "interleaved in 3 rounds" in result.stdout
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    timed = [row for row in rows if "p50_ms" in row]
    assert len(timed) == 2 and {row["seq"] for row in timed} == {16}
    for row in timed:
        assert row["rounds"] == 3 and len(row["round_p50_ms"]) == 3 and row["calls"] >= 9
        assert min(row["round_p50_ms"]) <= row["p50_ms"] <= max(row["round_p50_ms"])
    assert [row["skipped"] for row in rows if row["seq"] == 300] == ["outside the engine's shape range"] * 2
    torch_row = next(row for row in timed if row["name"] == "pytorch fp32 eager")
    engine_row = next(row for row in timed if row["name"] != "pytorch fp32 eager")
    assert engine_row["vs_torch"] == round(torch_row["p50_ms"] / engine_row["p50_ms"], 3)


def test_an_interleaved_subject_that_dies_is_one_line_naming_it():
    """A worker that fails to load (here, a kind no worker knows) ends the run with its last stderr
    line and the subject's name, and takes the other workers down with it."""
    import pytest

    from miaotui.bench import Subject, run_bench
    from miaotui.errors import InputError
    from miaotui.models import resolve_config

    config = str(resolve_config("lstm-sentiment").path)
    subjects = [Subject("pytorch", "torch", None, config), Subject("broken", "no-such-kind")]
    with pytest.raises(InputError, match=r"benchmarking broken failed: ValueError: unknown subject kind 'no-such-kind'"):
        run_bench(subjects, [1], [8], 1, progress=False, min_seconds=0.2, rounds=2)


def test_bench_refuses_bad_sizes_and_missing_engines(tmp_path: Path):
    bad = run_cli("bench", "--torch", "lstm-sentiment", "--batch", "0,4")
    assert bad.returncode == 2 and "--batch 0,4" in bad.stderr
    missing = run_cli("bench", str(tmp_path / "none.ort"))
    assert missing.returncode == 2 and "none.ort: engine file does not exist" in missing.stderr
    nothing = run_cli("bench")
    assert nothing.returncode == 2 and "nothing to time" in nothing.stderr
