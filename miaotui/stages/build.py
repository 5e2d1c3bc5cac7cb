"""The build stage: engines/<name>.<backend>.<precision><suffix> + sidecar from the work dir's graph of
that precision, skipped when the graph, the shape ranges and the options are unchanged."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from miaotui.artifacts import sha256_json
from miaotui.engines import BuildOptions, build_engine, get_backend, read_metadata
from miaotui.engines.build import timing_cache_path
from miaotui.engines.metadata import EngineMetadata
from miaotui.errors import InputError
from miaotui.stages.runner import Pipeline, StageResult, Unit
from miaotui.workdir import GRAPH_STAGES, GRAPHS, sidecar_path


@dataclass
class BuildStageResult(StageResult):
    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)

    @property
    def metadata(self) -> EngineMetadata:
        return read_metadata(self.path)

    @property
    def backend(self) -> str:
        return self.details["backend"]

    @property
    def precision(self) -> str:
        return self.details["precision"]

    @property
    def check(self) -> str:
        return get_backend(self.backend).describe(self.metadata)


class Build(Unit):
    """Build the engine for `options.backend` and `options.precision` (default int8) from the work
    dir's graph of that precision, after the stages that write it."""

    stage = "build"
    result_type = BuildStageResult

    def __init__(self, options: BuildOptions | None = None):
        options = options or BuildOptions()
        precision = options.precision or "int8"
        if precision not in GRAPHS:
            raise InputError(f"--precision {precision}: expected one of {', '.join(GRAPHS)}")
        self.build_options = replace(options, precision=precision)
        self.backend = get_backend(options.backend)
        self.name = f"build:{options.backend}:{precision}"
        self.source_stage = GRAPH_STAGES[precision]
        self.needs = (self.source_stage,)

    def prepare(self, pipeline: Pipeline) -> None:
        self.primary = pipeline.work.engine_name(pipeline.config.name, self.backend.name,
                                                 self.build_options.precision, self.backend.suffix)

    def inputs(self, pipeline: Pipeline) -> dict[str, str]:
        view = pipeline.config.to_dict()
        source = GRAPHS[self.build_options.precision]
        dims_view = {"inputs": view["inputs"], "dims": view["dims"]}
        return {source: pipeline.work.record(self.source_stage).outputs[source], "shapes": sha256_json(dims_view)}

    def options(self) -> dict[str, Any]:
        return asdict(self.build_options)

    def tools(self) -> dict[str, str]:
        return {self.backend.name: self.backend.version(), f"miaotui {self.backend.name} form": self.backend.form}

    def produce(self, pipeline: Pipeline, scratch: Path) -> dict[str, Any]:
        target = scratch / self.primary
        target.parent.mkdir(parents=True, exist_ok=True)
        source = pipeline.result(self.source_stage).path
        built = build_engine(source, target, self.build_options, pipeline.config,
                             cache_path=timing_cache_path(pipeline.work.path(self.primary)))
        meta = built.metadata
        return {"backend": meta.backend, "backend_version": meta.backend_version, "precision": meta.precision,
                "device": meta.device, "checks": meta.checks, "network": meta.network,
                "settings": meta.settings, "warnings": list(built.warnings)}
