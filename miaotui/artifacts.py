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
from collections.abc import Iterator
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
