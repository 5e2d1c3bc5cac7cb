"""The export stage in a work directory: skipped when its inputs are unchanged, atomic otherwise."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from miaotui.artifacts import StageRecord, WorkDir, sha256_file, sha256_json, stage_key
from miaotui.config import Config
from miaotui.export.parity import FLOAT32_ATOL, ParityResult, check_parity, parity_sizes
from miaotui.export.torch_to_onnx import ExportOptions, export_to_onnx

STAGE = "export"
ONNX_NAME = "model.onnx"


@dataclass
class ExportResult:
    onnx_path: Path
    files: list[Path]  # model.onnx, and model.onnx.data when the weights are external
    parity: list[ParityResult] = field(default_factory=list)
    seconds: float = 0.0
    skipped: bool = False  # the manifest showed nothing changed

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def stage_inputs(config: Config) -> dict[str, str]:
    """The files (and resolved config) whose change makes the export stale."""
    from miaotui.models.loading import factory_sources

    inputs = {"config": sha256_json(_export_view(config))}
    sources = factory_sources(config.model.factory)
    if sources:
        inputs["factory"] = sha256_json({str(p): sha256_file(p) for p in sources})
    if config.model.checkpoint:
        inputs["checkpoint"] = sha256_file(config.model.checkpoint)
    return inputs


def _export_view(config: Config) -> dict:
    # Only what shapes the exported graph; [data] or [validate] edits must not force a re-export.
    view = config.to_dict()
    return {k: view[k] for k in ("model", "inputs", "dims", "export")}


def write_resolved_config(config: Config, work: WorkDir) -> None:
    import tomli_w

    from miaotui.artifacts import atomic_write_bytes

    data = tomli_w.dumps(config.to_dict()).encode()
    target = work.path("config.toml")
    if not target.is_file() or target.read_bytes() != data:
        atomic_write_bytes(target, data)


def run_export_stage(config: Config, work_dir: str | Path, options: ExportOptions | None = None,
                     force: bool = False, model=None) -> ExportResult:
    """Export the config's model into `work_dir`/model.onnx unless the manifest says it is current.

    All user input (config, factory, checkpoint) is checked before the work dir is touched, so a
    mistake leaves nothing behind.
    """
    from miaotui.models.loading import load_model

    options = options or ExportOptions(opset=config.export.opset)
    work = WorkDir(work_dir)
    inputs = stage_inputs(config)
    option_view = asdict(options) | {"atol": FLOAT32_ATOL}
    key = stage_key(inputs, option_view, tool_versions())
    onnx_path = work.path(ONNX_NAME)
    if not force and work.is_current(STAGE, key):
        record = work.record(STAGE)
        files = [work.path(name) for name in record.outputs]
        parity = [ParityResult(**p) for p in record.details.get("parity", [])]
        return ExportResult(onnx_path, files, parity, record.seconds, skipped=True)

    model = model if model is not None else load_model(config)
    started = time.perf_counter()
    with work.staging() as scratch:
        staged = export_to_onnx(model, config, scratch / ONNX_NAME, options)
        parity = check_parity(model, config, staged, parity_sizes(config))
        produced = sorted(scratch.iterdir())
        # The data file first: model.onnx must never point at weights that are not there yet.
        for path in sorted(produced, key=lambda p: p.name == ONNX_NAME):
            os.replace(path, work.path(path.name))
        stale = work.path(ONNX_NAME + ".data")
        if stale.exists() and not any(p.name == stale.name for p in produced):
            stale.unlink()
        write_resolved_config(config, work)
    files = [work.path(p.name) for p in produced]
    seconds = time.perf_counter() - started
    work.save_record(
        STAGE,
        StageRecord(
            key=key,
            inputs=inputs,
            options=option_view,
            tool_versions=tool_versions(),
            outputs={p.name: sha256_file(p) for p in files},
            seconds=round(seconds, 3),
            details={"parity": [asdict(p) for p in parity]},
        ),
    )
    return ExportResult(onnx_path, files, parity, seconds)
