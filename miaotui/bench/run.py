"""Runs each benchmark subject in its own process (miaotui.bench.worker) and gathers the rows: one
subject after another, or (rounds > 1) all loaded at once and timed in alternating rounds, so that a
shared machine's drift lands on every subject alike instead of on whichever ran in a slow spell."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from miaotui.errors import InputError


@dataclass(frozen=True)
class Subject:
    name: str  # how the tables and the plot call it
    kind: str  # engine | onnx | torch | torch-dynamic-int8
    path: str | None = None  # the engine or .onnx file
    config: str | None = None  # the model's config (torch subjects; value ranges for the others)


# Between two subjects' slices in interleaved mode: the last one's idle threads stop spinning (GNU
# OpenMP's and ONNX Runtime's spin-waits last well under this) before the next one is timed.
SETTLE_SECONDS = 0.3


def _spec(subject: Subject, batches: list[int], seqs: list[int], threads: int, min_seconds: float,
          warmup_seconds: float) -> dict:
    return {"name": subject.name, "kind": subject.kind, "path": subject.path, "config": subject.config,
            "batches": batches, "seqs": seqs, "threads": threads, "min_seconds": min_seconds,
            "warmup_seconds": warmup_seconds}


def run_bench(subjects: list[Subject], batches: list[int], seqs: list[int], threads: int, progress: bool = True,
              min_seconds: float = 2.0, warmup_seconds: float = 0.5, rounds: int = 1) -> list[dict]:
    """A row per subject and shape. `rounds` > 1: interleaved, each shape's `min_seconds` split into
    that many slices, the subjects' order reversed every other round; the row's p50 is over every
    slice's calls and `round_p50_ms` holds each slice's own."""
    from tqdm import tqdm

    if threads < 1:
        raise InputError(f"--threads {threads}: expected at least 1")
    if not batches or not seqs or min(batches) < 1 or min(seqs) < 1:
        raise InputError("--batch and --seq take positive sizes, e.g. --batch 1,8,32 --seq 128")
    if rounds < 1:
        raise InputError(f"--rounds {rounds}: expected at least 1")
    if rounds > 1:
        return with_torch_ratios(_interleaved(subjects, batches, seqs, threads, progress, min_seconds,
                                              warmup_seconds, rounds))
    rows = []
    with tqdm(total=len(subjects) * len(batches) * len(seqs), desc="bench", unit="shape", disable=not progress) as bar:
        for subject in subjects:
            spec = _spec(subject, batches, seqs, threads, min_seconds, warmup_seconds)
            process = subprocess.Popen([sys.executable, "-m", "miaotui.bench.worker", json.dumps(spec)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for line in process.stdout:
                row = json.loads(line)
                if "error" in row:
                    process.wait()
                    raise InputError(row["error"])
                rows.append(row)
                bar.set_postfix_str(f"{subject.name} b{row['batch']} s{row['seq']}")
                bar.update(1)
            if process.wait() != 0:
                last = (process.stderr.read().strip().splitlines() or ["no message"])[-1]
                raise InputError(f"benchmarking {subject.name} failed: {last}")
    return with_torch_ratios(rows)


def _interleaved(subjects: list[Subject], batches: list[int], seqs: list[int], threads: int, progress: bool,
                 min_seconds: float, warmup_seconds: float, rounds: int) -> list[dict]:
    from tqdm import tqdm

    from miaotui.bench.worker import summarize

    processes, errors = {}, {}
    try:
        for subject in subjects:  # every subject loaded in its own process before any is timed
            spec = _spec(subject, batches, seqs, threads, min_seconds, warmup_seconds) | {"serve": True}
            # stderr to a file: a worker's warnings must not fill a pipe nobody reads until the end
            errors[subject.name] = tempfile.TemporaryFile("w+")
            processes[subject.name] = subprocess.Popen(
                [sys.executable, "-m", "miaotui.bench.worker", json.dumps(spec)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=errors[subject.name], text=True)
        for name, process in processes.items():
            _answer(name, process, errors[name])
        latencies: dict[tuple, list[list[float]]] = {}
        skipped: dict[tuple, str] = {}  # what the worker said instead of timing the shape
        shapes = [(batch, seq) for seq in seqs for batch in batches]
        with tqdm(total=rounds * len(shapes) * len(subjects), desc="bench (interleaved)", unit="slice",
                  disable=not progress) as bar:
            for round_ in range(rounds):
                order = subjects if round_ % 2 == 0 else subjects[::-1]
                for batch, seq in shapes:
                    for subject in order:
                        key = (subject.name, batch, seq)
                        if key in skipped:
                            bar.update(1)
                            continue
                        process = processes[subject.name]
                        process.stdin.write(f"{batch} {seq} {min_seconds / rounds}\n")
                        process.stdin.flush()
                        answer = _answer(subject.name, process, errors[subject.name])
                        if "skipped" in answer:
                            skipped[key] = answer["skipped"]
                        else:
                            latencies.setdefault(key, []).append(answer["latencies"])
                        bar.set_postfix_str(f"round {round_ + 1} {subject.name} b{batch} s{seq}")
                        bar.update(1)
                        time.sleep(SETTLE_SECONDS)
    finally:
        for process in processes.values():
            process.stdin.close()
            process.kill()
            process.wait()
        for file in errors.values():
            file.close()
    rows = []
    for subject in subjects:
        for batch, seq in shapes:
            row = {"name": subject.name, "kind": subject.kind, "batch": batch, "seq": seq, "threads": threads}
            key = (subject.name, batch, seq)
            if key in skipped:
                rows.append(row | {"skipped": skipped[key]})
                continue
            slices = latencies[key]
            row |= summarize([value for part in slices for value in part], batch)
            row["rounds"] = rounds
            row["round_p50_ms"] = [summarize(part, batch)["p50_ms"] for part in slices]  # unrounded: p50_ms lies between them
            rows.append(row)
    return rows


def _answer(name: str, process: subprocess.Popen, errors) -> dict:
    """The worker's next JSON line, or one line saying why it has none (the last of its stderr)."""
    line = process.stdout.readline()
    answer = json.loads(line) if line.strip() else None
    if answer is None:
        process.kill()
        process.wait()
        errors.seek(0)
        last = (errors.read().strip().splitlines() or ["no message"])[-1]
        raise InputError(f"benchmarking {name} failed: {last}")
    if "error" in answer:
        raise InputError(answer["error"])
    return answer


# Below this many timed calls a p50 rests on too little (a loaded machine, one slow call): say so.
MIN_STEADY_CALLS = 20


def with_torch_ratios(rows: list[dict]) -> list[dict]:
    """Each timed row gets `vs_torch`: PyTorch's p50 over its own at the same batch and seq (when
    PyTorch FP32 was timed), so a speed-up is read off the row, not worked out by hand."""
    torch = {(r["batch"], r["seq"]): r["p50_ms"] for r in rows if r.get("kind") == "torch" and "p50_ms" in r}
    for row in rows:
        base = torch.get((row["batch"], row["seq"]))
        if base is not None and "p50_ms" in row:
            row["vs_torch"] = round(base / row["p50_ms"], 3)
    return rows


def unsteady(rows: list[dict]) -> list[str]:
    """A warning per row timed on fewer than MIN_STEADY_CALLS calls."""
    return [f"{r['name']} batch {r['batch']} seq {r['seq']}: p50 of only {r['calls']} calls; a longer --seconds "
            "gives a steadier figure" for r in rows if r.get("calls", MIN_STEADY_CALLS) < MIN_STEADY_CALLS]


def engine_subjects(engines: list[Path]) -> list[Subject]:
    """A subject per engine file, named by backend, precision and file (and work dir, where two share a name)."""
    from miaotui.engines.metadata import read_metadata
    from miaotui.workdir import WorkDir

    subjects = []
    same_names = len({engine.name for engine in engines}) < len(engines)
    for engine in engines:
        if not engine.is_file():
            raise InputError(f"{engine}: engine file does not exist")
        metadata = read_metadata(engine)
        work = WorkDir.around(engine)
        label = f"{work.root.name}/{engine.name}" if same_names else engine.name
        subjects.append(Subject(f"{metadata.backend} {metadata.precision} ({label})", "engine",
                                str(engine.resolve()), str(work.config.resolve()) if work.has_config() else None))
    return subjects


def torch_subject(config_path: Path) -> Subject:
    return Subject("pytorch fp32 eager", "torch", None, str(config_path))


def default_report_dir(engines: list[Path], torch_model: str | None) -> Path:
    """reports/ of the first engine's work dir, else build/<model>/reports for PyTorch alone."""
    from miaotui.workdir import REPORTS, WorkDir

    if engines:
        work = WorkDir.of_engine(engines[0])
        return work.reports_dir if work is not None else Path(REPORTS)
    from miaotui.models import resolve_config

    return WorkDir.for_model(resolve_config(torch_model).name).reports_dir
