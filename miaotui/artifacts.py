"""The work directory: atomic writes, manifest.json, and make-like stage skipping.

A stage is current when the manifest records the same key (a hash of its input files' sha256s,
its options and the tool versions) and every output it recorded is still there with the same
sha256. Files are written under a temporary name in the same folder and renamed, so a crash or a
failed check never leaves half an artifact under its real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """A temporary path beside `final`, renamed onto it only when the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(final: str | Path, value: Any) -> None:
    atomic_write_bytes(final, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode())


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


def stage_key(inputs: dict[str, str], options: dict[str, Any], tool_versions: dict[str, str]) -> str:
    return sha256_json({"inputs": inputs, "options": options, "tools": tool_versions})


class WorkDir:
    """build/<name>/: every stage reads its predecessor's files here and writes its own."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

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

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A scratch folder inside the work dir for multi-file outputs; removed afterwards, and the
        work dir itself too when this run created it and a failure left it empty."""
        created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            yield scratch
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            if created and not any(self.root.iterdir()):
                self.root.rmdir()
            raise
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class StageResult:
    stage: str
    path: Path  # the stage's main artifact
    files: list[Path]  # every file it wrote (an .onnx and, for large models, its .data)
    seconds: float = 0.0
    skipped: bool = False  # the manifest showed nothing changed
    details: dict[str, Any] = field(default_factory=dict)  # what the stage measured

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def run_stage(work: WorkDir, tools: dict[str, str], stage: str, primary: str, inputs: dict[str, str],
              options: dict[str, Any], produce: Callable[[Path], dict[str, Any]], force: bool,
              result_type=StageResult) -> StageResult:
    """Skip when current; else `produce(scratch)` writes the outputs into a scratch folder (sub-folders
    such as engines/ allowed) and returns what it measured, and the outputs are renamed into place.
    `primary` is the main artifact's path relative to the work dir; `tools` the versions that matter."""
    key = stage_key(inputs, options, tools)
    if not force and work.is_current(stage, key):
        record = work.record(stage)
        files = [work.path(name) for name in sorted(record.outputs, key=lambda name: name != primary)]
        return result_type(stage, work.path(primary), files, record.seconds, skipped=True, details=record.details)

    started = time.perf_counter()
    with work.staging() as scratch:
        details = produce(scratch)
        produced = sorted(p.relative_to(scratch).as_posix() for p in scratch.rglob("*") if p.is_file())
        # Weights first and the main artifact last: an .onnx must never point at a .data file that
        # is not there yet, and an engine's sidecar describes a file already in place.
        for name in sorted(produced, key=lambda name: name == primary):
            work.path(name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(scratch / name, work.path(name))
        stale = work.path(primary + ".data")
        if stale.exists() and all(name != primary + ".data" for name in produced):
            stale.unlink()
    names = sorted(produced, key=lambda name: name != primary)  # main artifact first
    files = [work.path(name) for name in names]
    seconds = time.perf_counter() - started
    outputs = {name: sha256_file(work.path(name)) for name in names}
    work.save_record(stage, StageRecord(key, inputs, options, tools, outputs, round(seconds, 3), details=details))
    return result_type(stage, work.path(primary), files, seconds, details=details)
