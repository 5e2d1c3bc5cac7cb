"""Which of a work dir's engines to use: WorkDir.choose_engine's rule, with the facts the registry knows
(which backends exist, which run on this machine, which Triton serves). The runtime, the gate and
Triton packaging all choose through here."""

from __future__ import annotations

from pathlib import Path

from miaotui.engines.backend import engine_suffixes, get_backend, preference_order, triton_backends
from miaotui.engines.metadata import read_metadata
from miaotui.errors import InputError
from miaotui.workdir import WorkDir

# purpose -> what the error says when no engine fits it
PURPOSES = {"run here": "", "for Triton": " that Triton serves (its TensorRT backend runs data-centre TensorRT plans, "
                                          "not TensorRT-RTX ones)"}


def this_machine() -> str:
    """What a speed measured here is valid for: the CPU model, its instruction sets and its CPU count."""
    import os

    from miaotui.engines.onnxruntime_backend import cpu_description

    cpu = cpu_description()
    return f"{cpu['cpu']} ({cpu['machine']}, {os.cpu_count()} CPUs; {' '.join(cpu['isa'])})"


def gate_timings(work_dir: str | Path, engine: Path, machine: str | None = None) -> tuple[float, float] | None:
    """(seconds per validation sample in the set's batches, seconds per single-sample call) of `engine`,
    as its passing parity gate measured them on this machine (reports/<engine>/parity.json; `machine`:
    this_machine(), when the caller has it); None when there is no such measurement of this very file."""
    import json

    report_path = WorkDir(work_dir).parity_report(engine)
    try:
        report = json.loads(report_path.read_text())
        sha = read_metadata(engine).engine_sha256
    except (OSError, ValueError, InputError):
        return None
    if not (report.get("passed") and report.get("engine_sha256") == sha and report.get("machine") == (machine or this_machine())
            and report.get("engine_seconds", 0) > 0 and report.get("samples", 0) > 0 and report.get("single_seconds", 0) > 0):
        return None
    return report["engine_seconds"] / report["samples"], report["single_seconds"]


def work_dir_engines(work_dir: str | Path) -> list[tuple[Path, str, str]]:
    """(engine, backend, precision) of every engine in the work dir's engines/ folder."""
    engines = WorkDir(work_dir).engines(engine_suffixes())
    return [(path, meta.backend, meta.precision) for path, meta in ((p, read_metadata(p)) for p in engines)]


def choose_engine(work_dir: str | Path, backend: str | None = None, precision: str | None = None,
                  purpose: str = "run here") -> Path:
    """The engine asked for, else the best one for `purpose`: "run here" prefers engines this machine
    runs (a TensorRT plan where a GPU is, the CPU engine otherwise), "for Triton" only takes engines
    Triton serves; then, where the parity gate timed each of them on this machine, the one with the
    lowest product of its seconds per sample in batches and per one-sample call (minilm-sentiment on
    an AMX CPU: the openvino engine), else GPU plans before CPU engines, INT8 first."""
    if purpose == "for Triton":
        candidates = [c for c in work_dir_engines(work_dir) if c[1] in triton_backends()]
        usable = lambda name: True  # noqa: E731
    else:
        candidates = work_dir_engines(work_dir)
        usable = lambda name: get_backend(name).cannot_run_here() is None  # noqa: E731
    machine = this_machine()  # read once, not per candidate
    return WorkDir(work_dir).choose_engine(candidates, backend, precision, preference_order(), PURPOSES[purpose], usable,
                                           lambda engine: gate_timings(work_dir, engine, machine))
