"""The work directory, build/<name>/: the one module that knows its file names.

    config.toml                       the resolved config the run used
    model.onnx  model.opt.onnx  model.int8.onnx  (model.fp16.onnx  model.int8-fp16.onnx)
    calibration.json  quantization.json
    engines/<name>.<backend>.<precision><suffix>  + a .json sidecar each
    reference.npz                     PyTorch outputs on the validation split
    reports/...                       parity, bench, layers reports
    manifest.json                     per stage: input sha256s, options, tool versions, outputs, seconds

It also keeps the manifest (make-like skipping: a stage is current when the manifest records the
same key and every output it recorded still has the same sha256) and the one rule that picks a
work dir's engine for a purpose (the runtime, the gate and Triton packaging use it alike).
Standard library only: the runtime imports it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from miaotui.artifacts import atomic_write_json, sha256_file
from miaotui.errors import InputError

BUILD_ROOT = "build"  # work dirs default to build/<model name>, relative to where the command runs
CONFIG = "config.toml"
MANIFEST = "manifest.json"
EXPORTED = "model.onnx"
# The graph each precision's engines are built from, and the stage that writes it.
GRAPHS = {"fp32": "model.opt.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx",
          "int8-fp16": "model.int8-fp16.onnx"}
GRAPH_STAGES = {"fp32": "optimize", "int8": "quantize", "fp16": "fp16", "int8-fp16": "int8-fp16"}
CALIBRATION = "calibration.json"
QUANTIZATION = "quantization.json"
REFERENCE = "reference.npz"
ENGINES = "engines"
REPORTS = "reports"
SIDECAR_SUFFIX = ".json"  # an engine's sidecar is ENGINE + ".json"
STAGING_PREFIX = ".staging-"  # a stage's scratch folder inside the work dir
LOCK_SUFFIX = ".lock"  # build/.<name>.lock beside the work dir: one run at a time
_HELD_LOCKS: dict[str, int] = {}  # lock path -> depth, for this process (flock is per open file)
# What reports/ holds: per engine reports/<engine>/parity.*, and bench.* and layers.* beside them.
PARITY_REPORTS = ("parity.json", "parity.md", "parity.xml")
BENCH_REPORTS = ("bench.json", "bench.md", "bench.png")
LAYERS_REPORT = "layers.json"
LAYERS_PLOT = "layers.png"
# Which precision to prefer when nothing is asked for: the fastest that passes the gate first.
PRECISION_PREFERENCE = ("int8", "int8-fp16", "fp16", "fp32")


def _tell_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + SIDECAR_SUFFIX)


def engine_file_name(model: str, backend: str, precision: str, suffix: str) -> str:
    return f"{model}.{backend}.{precision}{suffix}"


@dataclass
class StageRecord:
    """What the manifest keeps of one stage run."""

    key: str
    inputs: dict[str, str]  # name -> sha256 of each input file
    options: dict[str, Any]
    tool_versions: dict[str, str]
    outputs: dict[str, str]  # file name in the work dir -> sha256
    seconds: float
    finished: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    details: dict[str, Any] = field(default_factory=dict)  # what the stage measured


class WorkDir:
    """build/<name>/: every stage reads its predecessor's files here and writes its own."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"WorkDir({str(self.root)!r})"

    # -- where things are --------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def exported(self) -> Path:
        return self.root / EXPORTED

    def graph(self, precision: str) -> Path:
        """The ONNX graph engines of `precision` are built from."""
        if precision not in GRAPHS:
            raise InputError(f"--precision {precision}: expected one of {', '.join(GRAPHS)}")
        return self.root / GRAPHS[precision]

    @property
    def optimized(self) -> Path:
        return self.graph("fp32")

    @property
    def calibration(self) -> Path:
        return self.root / CALIBRATION

    @property
    def quantization(self) -> Path:
        return self.root / QUANTIZATION

    @property
    def reference(self) -> Path:
        return self.root / REFERENCE

    @property
    def engines_dir(self) -> Path:
        return self.root / ENGINES

    @property
    def reports_dir(self) -> Path:
        return self.root / REPORTS

    def engine_name(self, model: str, backend: str, precision: str, suffix: str) -> str:
        """The engine's path relative to the work dir (what the manifest records)."""
        return f"{ENGINES}/{engine_file_name(model, backend, precision, suffix)}"

    def report_dir(self, engine: str | Path) -> Path:
        """reports/<engine file name without its suffix>: the parity reports of one engine."""
        return self.reports_dir / Path(engine).name.rsplit(".", 1)[0]

    def parity_report(self, engine: str | Path) -> Path:
        """reports/<engine>/parity.json: the gate's full report on one engine."""
        return self.report_dir(engine) / PARITY_REPORTS[0]

    def has_config(self) -> bool:
        return self.config.is_file()

    def model_table(self) -> dict[str, Any] | None:
        """config.toml's [model] table as written (tokenizer, labels, outputs), read with the standard
        library; None when the work dir has no config.toml."""
        import tomllib

        if not self.config.is_file():
            return None
        try:
            return tomllib.loads(self.config.read_text(encoding="utf-8")).get("model", {})
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"{self.config}: not valid TOML: {error}") from None

    @classmethod
    def for_model(cls, name: str) -> "WorkDir":
        """The default work dir of a model: build/<name>."""
        return cls(Path(BUILD_ROOT) / name)

    @classmethod
    def of_engine(cls, engine: str | Path) -> "WorkDir | None":
        """The work dir holding `engine` when it sits in one's engines/ folder, else None."""
        engine = Path(engine)
        return cls(engine.parent.parent) if engine.parent.name == ENGINES else None

    @classmethod
    def around(cls, path: str | Path) -> "WorkDir":
        """The work dir of an engine inside one, else the folder the file sits in."""
        return cls.of_engine(path) or cls(Path(path).parent)

    # -- the manifest ------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"stages": {}}
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"stages": {}}  # a damaged manifest only costs a rerun
        return data if isinstance(data.get("stages"), dict) else {"stages": {}}

    def record(self, stage: str) -> StageRecord | None:
        entry = self.manifest()["stages"].get(stage)
        try:
            return StageRecord(**entry) if entry else None
        except TypeError:
            return None

    def is_current(self, stage: str, key: str) -> bool:
        record = self.record(stage)
        if record is None or record.key != key:
            return False
        for name, digest in record.outputs.items():
            path = self.path(name)
            if not path.is_file() or sha256_file(path) != digest:
                return False
        return True

    def save_record(self, stage: str, record: StageRecord) -> None:
        manifest = self.manifest()
        manifest["stages"][stage] = asdict(record)
        atomic_write_json(self.manifest_path, manifest)

    def graph_digests(self) -> set[str]:
        """sha256s of the ONNX graphs the manifest says this work dir made (any precision)."""
        return {digest for stage in GRAPH_STAGES.values() if (record := self.record(stage))
                for digest in record.outputs.values()}

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch folder inside the work dir for a stage's outputs; removed afterwards, and the
        work dir itself too when this run created it and a failure left it empty."""
        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        try:
            yield scratch
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            if created and not any(self.root.iterdir()):
                self.root.rmdir()
            raise
        shutil.rmtree(scratch, ignore_errors=True)

    def remove_stale_staging(self) -> list[Path]:
        """Scratch folders a killed run left behind (only call with the lock held: then none is in use)."""
        stale = sorted(self.root.glob(STAGING_PREFIX + "*")) if self.root.is_dir() else []
        for folder in stale:
            shutil.rmtree(folder, ignore_errors=True)
        return stale

    @property
    def lock_path(self) -> Path:
        return self.root.parent / f".{self.root.name}{LOCK_SUFFIX}"

    @contextlib.contextmanager
    def lock(self, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """One run at a time in this work dir: a second waits for the first (`on_wait` is told once),
        or with `wait=False` fails at once. Held, it removes the scratch folders a killed run left.
        Re-entrant within a process. Where the lock file cannot be written (a read-only folder) no
        other run can write either, and the block runs unlocked."""
        key = str(self.lock_path.absolute())
        if _HELD_LOCKS.get(key):
            _HELD_LOCKS[key] += 1
            try:
                yield
            finally:
                _HELD_LOCKS[key] -= 1
            return
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.lock_path, "a")
        except OSError as error:
            if error.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            yield
            return
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise InputError(f"{self.root}: another miaotui run is using this work dir (lock {self.lock_path}); "
                                     "let it finish, or run without --no-wait to wait for it") from None
                (on_wait or _tell_stderr)(f"{self.root}: another miaotui run is using this work dir; waiting for it "
                                          f"(lock {self.lock_path})")
                fcntl.flock(handle, fcntl.LOCK_EX)
            _HELD_LOCKS[key] = 1
            self.remove_stale_staging()
            yield
        finally:
            _HELD_LOCKS.pop(key, None)
            handle.close()  # closing the file releases the lock

    # -- engines -----------------------------------------------------------------------------
    def engines(self, suffixes: tuple[str, ...]) -> list[Path]:
        """Engine files (with their sidecars) in engines/, by name."""
        folder = self.engines_dir
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix in suffixes and sidecar_path(p).is_file())

    def choose_engine(self, candidates: list[tuple[Path, str, str]], backend: str | None, precision: str | None,
                      backend_order: tuple[str, ...], purpose: str, usable: Callable[[str], bool],
                      timings: Callable[[Path], tuple[float, ...] | None] = lambda path: None) -> Path:
        """The one engine-choice rule. `candidates` are (path, backend, precision) of this work dir's
        engines (`purpose` ends the message when none fits, e.g. " that Triton serves"); those asked for
        (`backend`, `precision`) are kept; of them the ones `usable` for the purpose come first. Then,
        when every usable one has `timings` (what the parity gate measured on this machine: seconds per
        sample in batches, seconds per single-sample call), the one with the lowest product of them (the
        geometric mean: batch throughput and one-at-a-time latency weigh alike); else by
        `backend_order` and PRECISION_PREFERENCE (INT8 first). When none is usable the best of the rest
        is returned: loading it then says why it cannot run here."""
        kept = [c for c in candidates if backend in (None, c[1]) and precision in (None, c[2])]
        if not kept:
            wanted = " ".join(filter(None, (backend, precision)))
            have = ", ".join(f"{b} {p}" for _, b, p in sorted(candidates, key=lambda c: c[1:])) or "none"
            raise InputError(f"{self.engines_dir}: no {wanted + ' ' if wanted else ''}engine there{purpose} (it has: "
                             f"{have}); build one with 'miaotui run' or 'miaotui build'")

        measured = {c[0]: timings(c[0]) for c in kept if usable(c[1])}
        fastest = None
        if len(measured) > 1 and all(value is not None for value in measured.values()):
            fastest = min(measured, key=lambda path: math.prod(measured[path]))

        def rank(candidate: tuple[Path, str, str]) -> tuple[int, int, int, int]:
            path, name, prec = candidate
            return (0 if usable(name) else 1,
                    0 if path == fastest else 1,
                    backend_order.index(name) if name in backend_order else len(backend_order),
                    PRECISION_PREFERENCE.index(prec) if prec in PRECISION_PREFERENCE else len(PRECISION_PREFERENCE))

        return min(kept, key=rank)[0]
