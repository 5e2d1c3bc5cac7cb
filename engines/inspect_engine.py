"""What an engine is: its sidecar, whether the file still matches it, and for a TensorRT plan the
layers and their precisions where the library can say (its engine inspector needs the plan
deserialized, which needs a GPU; without one, the layer counts the builder saw are shown)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miaotui.artifacts import sha256_file
from miaotui.engines.backend import get_backend
from miaotui.engines.metadata import EngineMetadata, read_metadata


@dataclass
class EngineReport:
    path: Path
    metadata: EngineMetadata
    file_matches: bool  # the engine's sha256 is the sidecar's
    layers: list[dict[str, Any]] = field(default_factory=list)  # from the engine inspector
    layers_unavailable: str | None = None  # why there is no layer list


def inspect_engine(path: str | Path) -> EngineReport:
    from miaotui.errors import InputError

    engine_path = Path(path)
    if engine_path.name.endswith(".json"):  # the sidecar named instead of the engine
        engine_path = engine_path.with_name(engine_path.name.removesuffix(".json"))
    if not engine_path.is_file():
        raise InputError(f"{engine_path}: file does not exist")
    metadata = read_metadata(engine_path)
    report = EngineReport(engine_path, metadata, sha256_file(engine_path) == metadata.engine_sha256)
    if report.file_matches:
        report.layers, report.layers_unavailable = get_backend(metadata.backend).layers(engine_path, metadata)
    return report
