"""The export and optimize stages in a work directory: skipped when their inputs are unchanged
(per manifest.json), written atomically otherwise."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from miaotui.artifacts import StageRecord, WorkDir, sha256_file, sha256_json, stage_key
from miaotui.config import Config
from miaotui.export.optimize import OPTIMIZE_ATOL, compare_onnx, optimize_onnx
from miaotui.export.parity import FLOAT32_ATOL, ParityResult, check_parity, parity_sizes
from miaotui.export.torch_to_onnx import PROTOBUF_LIMIT, ExportOptions, export_to_onnx

ONNX_NAME = "model.onnx"
OPT_NAME = "model.opt.onnx"


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


@dataclass
class ExportResult(StageResult):
    @property
    def onnx_path(self) -> Path:
        return self.path

    @property
    def parity(self) -> list[ParityResult]:
        return [ParityResult(**p) for p in self.details.get("parity", [])]


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import polygraphy
    import torch

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "polygraphy": polygraphy.__version__,
    }


def _graph_view(config: Config) -> dict:
    # Only what shapes the graph; [data] or [validate] edits must not force a re-export.
    view = config.to_dict()
    return {k: view[k] for k in ("model", "inputs", "dims", "export")}


def _run_stage(work: WorkDir, stage: str, primary: str, inputs: dict[str, str], options: dict[str, Any],
               produce: Callable[[Path], dict[str, Any]], force: bool, result_type=StageResult) -> StageResult:
    """Skip when current; else `produce(scratch)` writes the outputs into a scratch folder and
    returns what it measured, and the outputs are renamed into place."""
    tools = tool_versions()
    key = stage_key(inputs, options, tools)
    if not force and work.is_current(stage, key):
        record = work.record(stage)
        files = [work.path(name) for name in record.outputs]
        return result_type(stage, work.path(primary), files, record.seconds, skipped=True, details=record.details)

    started = time.perf_counter()
    with work.staging() as scratch:
        details = produce(scratch)
        produced = sorted(scratch.iterdir())
        # Weights first: an .onnx must never point at a .data file that is not there yet.
        for path in sorted(produced, key=lambda p: p.name == primary):
            os.replace(path, work.path(path.name))
        stale = work.path(primary + ".data")
        if stale.exists() and all(p.name != stale.name for p in produced):
            stale.unlink()
    files = [work.path(p.name) for p in produced]
    seconds = time.perf_counter() - started
    outputs = {p.name: sha256_file(p) for p in files}
    work.save_record(stage, StageRecord(key, inputs, options, tools, outputs, round(seconds, 3), details=details))
    return result_type(stage, work.path(primary), files, seconds, details=details)


def export_inputs(config: Config) -> dict[str, str]:
    """The files (and resolved config) whose change makes the export stale."""
    from miaotui.models.loading import factory_sources

    inputs = {"config": sha256_json(_graph_view(config))}
    sources = factory_sources(config.model.factory)
    if sources:
        inputs["factory"] = sha256_json({str(p): sha256_file(p) for p in sources})
    if config.model.checkpoint:
        inputs["checkpoint"] = sha256_file(config.model.checkpoint)
    return inputs


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

    A bad factory or checkpoint fails inside the staging area, which is removed together with the
    work dir when this run created it: a mistake leaves nothing behind.
    """
    from miaotui.models.loading import load_model

    options = options or ExportOptions(opset=config.export.opset)
    work = WorkDir(work_dir)

    def produce(scratch: Path) -> dict[str, Any]:
        nonlocal model
        model = model if model is not None else load_model(config)
        staged = export_to_onnx(model, config, scratch / ONNX_NAME, options)
        parity = check_parity(model, config, staged, parity_sizes(config))
        write_resolved_config(config, work)
        return {"parity": [asdict(p) for p in parity]}

    return _run_stage(work, "export", ONNX_NAME, export_inputs(config), asdict(options) | {"atol": FLOAT32_ATOL},
                      produce, force, ExportResult)


def run_optimize_stage(config: Config, work_dir: str | Path, force: bool = False,
                       external_data_threshold: int | None = None, export: ExportResult | None = None) -> StageResult:
    """model.onnx -> model.opt.onnx, running the export stage first unless `export` is its result.
    `force` redoes this stage only; the export is redone only when stale."""
    export = export or run_export_stage(config, work_dir)
    work = WorkDir(work_dir)
    threshold = external_data_threshold or PROTOBUF_LIMIT
    # The export's record holds the sha256s of model.onnx (and its .data), just verified or written.
    inputs = {"config": sha256_json(_graph_view(config))} | work.record("export").outputs

    def produce(scratch: Path) -> dict[str, Any]:
        report = optimize_onnx(export.path, scratch / OPT_NAME, threshold)
        report.max_abs_diff = compare_onnx(export.path, scratch / OPT_NAME, config, parity_sizes(config))
        return asdict(report)

    return _run_stage(work, "optimize", OPT_NAME, inputs, {"atol": OPTIMIZE_ATOL, "external_data_threshold": threshold},
                      produce, force)
