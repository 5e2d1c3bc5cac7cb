"""Which of a work dir's engines to use: WorkDir.choose_engine's rule, with the facts the registry knows
(which backends exist, which run on this machine, which Triton serves). The runtime, the gate and
Triton packaging all choose through here."""

from __future__ import annotations

from pathlib import Path

from miaotui.engines.backend import engine_suffixes, get_backend, preference_order, triton_backends
from miaotui.engines.metadata import read_metadata
from miaotui.workdir import WorkDir

# purpose -> what the error says when no engine fits it
PURPOSES = {"run here": "", "for Triton": " that Triton serves (its TensorRT backend runs data-centre TensorRT plans, "
                                          "not TensorRT-RTX ones)"}


def work_dir_engines(work_dir: str | Path) -> list[tuple[Path, str, str]]:
    """(engine, backend, precision) of every engine in the work dir's engines/ folder."""
    engines = WorkDir(work_dir).engines(engine_suffixes())
    return [(path, meta.backend, meta.precision) for path, meta in ((p, read_metadata(p)) for p in engines)]


def choose_engine(work_dir: str | Path, backend: str | None = None, precision: str | None = None,
                  purpose: str = "run here") -> Path:
    """The engine asked for, else the best one for `purpose`: "run here" prefers engines this machine
    runs (a TensorRT plan where a GPU is, the CPU engine otherwise), "for Triton" only takes engines
    Triton serves; then GPU plans before CPU engines, INT8 first."""
    if purpose == "for Triton":
        candidates = [c for c in work_dir_engines(work_dir) if c[1] in triton_backends()]
        usable = lambda name: True  # noqa: E731
    else:
        candidates = work_dir_engines(work_dir)
        usable = lambda name: get_backend(name).cannot_run_here() is None  # noqa: E731
    return WorkDir(work_dir).choose_engine(candidates, backend, precision, preference_order(), PURPOSES[purpose], usable)
