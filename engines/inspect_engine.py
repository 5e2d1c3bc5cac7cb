"""What an engine is: its sidecar, whether the file still matches it, and for a TensorRT plan the
layers and their precisions where the library can say (its engine inspector needs the plan
deserialized, which needs a GPU; without one, the layer counts the builder saw are shown)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miaotui.artifacts import sha256_file
from miaotui.engines.metadata import EngineMetadata, read_metadata


@dataclass
class EngineReport:
    path: Path
    metadata: EngineMetadata
    file_matches: bool  # the engine's sha256 is the sidecar's
    layers: list[dict[str, Any]] = field(default_factory=list)  # from the engine inspector
    layers_unavailable: str | None = None  # why there is no layer list


def _layer_precision(entry: dict[str, Any]) -> str:
    """The engine inspector's DETAILED JSON names formats like "Row major linear Int8"."""
    outputs = entry.get("Outputs") or []
    formats = [str(o.get("Format/Datatype", "")) for o in outputs if isinstance(o, dict)]
    return ", ".join(dict.fromkeys(f.rsplit(" ", 1)[-1] for f in formats if f)) or "?"


def plan_layers(metadata: EngineMetadata, engine_path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """(layers, None) from TensorRT's engine inspector, or ([], why not)."""
    from miaotui.cuda import no_gpu_reason
    from miaotui.engines.tensorrt_engine import import_tensorrt
    from miaotui.errors import InputError

    reason = no_gpu_reason()
    if reason:
        return [], f"listing a plan's layers needs a GPU to deserialize it, and {reason}"
    try:
        trt = import_tensorrt(metadata.backend)
    except InputError as error:
        return [], str(error)
    logger = trt.Logger(trt.Logger.ERROR)
    runtime = trt.Runtime(logger)
    plan = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if plan is None:
        return [], f"{metadata.backend} {trt.__version__} could not deserialize the plan (built with {metadata.backend_version})"
    inspector = plan.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = []
    for entry in info.get("Layers", []):  # plain JSON from here on, not TensorRT objects
        if isinstance(entry, dict):
            layers.append({"name": entry.get("Name", "?"), "type": entry.get("LayerType", "?"),
                           "precision": _layer_precision(entry)})
        else:  # built without detailed profiling verbosity: names only
            layers.append({"name": str(entry), "type": "?", "precision": "?"})
    return layers, None


def inspect_engine(path: str | Path) -> EngineReport:
    from miaotui.errors import InputError

    engine_path = Path(path)
    if engine_path.name.endswith(".json"):  # the sidecar named instead of the engine
        engine_path = engine_path.with_name(engine_path.name.removesuffix(".json"))
    if not engine_path.is_file():
        raise InputError(f"{engine_path}: file does not exist")
    metadata = read_metadata(engine_path)
    report = EngineReport(engine_path, metadata, sha256_file(engine_path) == metadata.engine_sha256)
    if metadata.backend in ("tensorrt", "tensorrt-rtx") and report.file_matches:
        report.layers, report.layers_unavailable = plan_layers(metadata, engine_path)
    return report
