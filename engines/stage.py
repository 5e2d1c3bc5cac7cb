"""The build stage in a work directory: engines/<name>.<backend>.<precision>.{ort,plan} + sidecar,
skipped (per manifest.json) when the ONNX file, the shape ranges and the options are unchanged."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from miaotui.artifacts import StageResult, WorkDir, run_stage, sha256_json
from miaotui.config import Config
from miaotui.engines.build import BuildOptions, build_engine, default_engine_name
from miaotui.engines.metadata import ENGINES_DIR, sidecar_path
from miaotui.engines.tensorrt_engine import FLAVOURS, timing_cache_path
from miaotui.errors import InputError
from miaotui.export.stage import FP16_NAME, INT8_FP16_NAME, INT8_NAME, OPT_NAME

# precision -> (the stage that writes its ONNX graph, that graph's name in the work dir)
SOURCES = {"fp32": ("optimize", OPT_NAME), "int8": ("quantize", INT8_NAME), "fp16": ("fp16", FP16_NAME),
           "int8-fp16": ("int8-fp16", INT8_FP16_NAME)}


@dataclass
class BuildStageResult(StageResult):
    warnings: list[str] = field(default_factory=list)
    earlier: list[StageResult] = field(default_factory=list)  # export, optimize, quantize runs made first

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)


def available_backends() -> list[str]:
    """onnxruntime always; tensorrt-rtx where its library imports (it builds without a GPU)."""
    import importlib.util

    backends = ["onnxruntime"]
    if any(importlib.util.find_spec(module) for module in FLAVOURS["tensorrt-rtx"].modules):
        backends.append("tensorrt-rtx")
    return backends


def _backend_version(backend: str) -> str:
    if backend == "onnxruntime":
        import onnxruntime

        return onnxruntime.__version__
    from miaotui.engines.tensorrt_engine import import_tensorrt

    return import_tensorrt(backend).__version__


def run_build_stage(config: Config, work_dir: str | Path, options: BuildOptions | None = None, force: bool = False,
                    progress: bool = True, earlier: list[StageResult] | None = None) -> BuildStageResult:
    """Build the engine for `options.backend` and `options.precision` (default int8) from the work
    dir's graph of that precision (SOURCES), running the stages before it when stale
    (unless `earlier` holds the results of those runs, made just before for another backend)."""
    from miaotui.export import run_fp16_stage
    from miaotui.export.stage import stages_before

    options = options or BuildOptions()
    precision = options.precision or "int8"
    if precision not in SOURCES:
        raise InputError(f"--precision {precision}: expected one of {', '.join(SOURCES)}")
    options = replace(options, precision=precision)
    stage_of_source, source_name = SOURCES[precision]
    earlier = stages_before(config, work_dir, earlier, "int8" in precision, progress)
    if precision in ("fp16", "int8-fp16") and not any(r.stage == precision for r in earlier):
        half = run_fp16_stage(config, work_dir, precision, progress=progress, earlier=earlier)
        earlier = earlier + [half]
    source = next(r.path for r in earlier if r.stage == stage_of_source)

    work = WorkDir(work_dir)
    name = f"{ENGINES_DIR}/{default_engine_name(config.name, options.backend, precision)}"
    dims_view = {"inputs": config.to_dict()["inputs"], "dims": config.to_dict()["dims"]}
    inputs = {source_name: work.record(stage_of_source).outputs[source_name], "shapes": sha256_json(dims_view)}
    tools = {options.backend: _backend_version(options.backend)}
    warnings: list[str] = []

    def produce(scratch: Path) -> dict[str, Any]:
        target = scratch / name
        target.parent.mkdir(parents=True, exist_ok=True)
        built = build_engine(source, target, options, config, cache_path=timing_cache_path(work.path(name)))
        warnings.extend(built.warnings)
        meta = built.metadata
        return {"backend": meta.backend, "backend_version": meta.backend_version, "precision": meta.precision,
                "device": meta.device, "checks": meta.checks, "network": meta.network,
                "settings": meta.settings, "warnings": list(built.warnings)}

    result = run_stage(work, tools, f"build:{options.backend}:{precision}", name, inputs, asdict(options), produce, force,
                       BuildStageResult)
    result.stage = "build"
    result.warnings = list(result.details.get("warnings", []))
    result.earlier = earlier
    return result
