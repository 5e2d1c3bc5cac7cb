"""The export and optimize stages: model.onnx (checked against PyTorch), model.opt.onnx."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from miaotui.artifacts import atomic_write_bytes, sha256_file, sha256_json
from miaotui.config import Config
from miaotui.export.optimize import OPTIMIZE_ATOL
from miaotui.export.parity import FLOAT32_ATOL, ParityResult
from miaotui.export.torch_to_onnx import PROTOBUF_LIMIT, ExportOptions
from miaotui.stages.runner import Pipeline, StageResult, Unit
from miaotui.workdir import EXPORTED, GRAPHS


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


def graph_view(config: Config) -> dict:
    # Only what shapes the graph; [data] or [validate] edits must not force a re-export.
    view = config.to_dict()
    return {k: view[k] for k in ("model", "inputs", "dims", "export")}


def model_inputs(config: Config) -> dict[str, str]:
    """The files (and resolved config) whose change makes anything computed from the model stale."""
    from miaotui.models.loading import model_sources

    inputs = {"config": sha256_json(graph_view(config))}
    sources = model_sources(config)
    if sources:
        inputs["factory"] = sha256_json({str(p): sha256_file(p) for p in sources})
    if config.model.checkpoint:
        inputs["checkpoint"] = sha256_file(config.model.checkpoint)
    return inputs


def write_resolved_config(config: Config, pipeline: Pipeline) -> None:
    import tomli_w

    data = tomli_w.dumps(config.to_dict()).encode()
    target = pipeline.work.config
    if not target.is_file() or target.read_bytes() != data:
        atomic_write_bytes(target, data)


@dataclass
class ExportResult(StageResult):
    @property
    def onnx_path(self) -> Path:
        return self.path

    @property
    def parity(self) -> list[ParityResult]:
        return [ParityResult(**p) for p in self.details.get("parity", [])]

    @property
    def check(self) -> str:
        worst = max((max(p.max_abs_diff.values(), default=0.0) for p in self.parity), default=0.0)
        shapes = "; ".join(p.shape_text() for p in self.parity)
        return f"onnx.checker ok; vs torch max |diff| {worst:.0e} at {shapes}"


class Export(Unit):
    """The config's PyTorch model -> model.onnx, checked against PyTorch at two shapes.

    A bad factory or checkpoint fails inside the staging area, which is removed together with the
    work dir when this run created it: a mistake leaves nothing behind."""

    name = "export"
    primary = EXPORTED
    result_type = ExportResult

    def __init__(self, options: ExportOptions | None = None, model=None):
        self.export_options = options
        self.model = model  # an already loaded model (tests); else the config's factory builds it

    def _options(self, config: Config) -> ExportOptions:
        return self.export_options or ExportOptions(opset=config.export.opset)

    def prepare(self, pipeline: Pipeline) -> None:
        self.resolved = self._options(pipeline.config)

    def inputs(self, pipeline: Pipeline) -> dict[str, str]:
        return model_inputs(pipeline.config)

    def options(self) -> dict[str, Any]:
        return asdict(self.resolved) | {"atol": FLOAT32_ATOL}

    def tools(self) -> dict[str, str]:
        return tool_versions()

    def produce(self, pipeline: Pipeline, scratch: Path) -> dict[str, Any]:
        from miaotui.export.parity import check_parity, parity_sizes
        from miaotui.export.torch_to_onnx import export_to_onnx
        from miaotui.models.loading import load_model

        config = pipeline.config
        model = self.model if self.model is not None else load_model(config)
        staged = export_to_onnx(model, config, scratch / EXPORTED, self.resolved)
        parity = check_parity(model, config, staged, parity_sizes(config))
        write_resolved_config(config, pipeline)
        return {"parity": [asdict(p) for p in parity]}


@dataclass
class OptimizeResult(StageResult):
    @property
    def nodes_before(self) -> int:
        return self.details["nodes_before"]

    @property
    def nodes_after(self) -> int:
        return self.details["nodes_after"]

    @property
    def max_abs_diff(self) -> float:
        return self.details["max_abs_diff"]

    @property
    def check(self) -> str:
        narrowed = self.details.get("pooled_row_nodes", 0)
        pooled = f" ({narrowed} on the pooled token only)" if narrowed else ""
        return (f"{self.nodes_before} -> {self.nodes_after} nodes{pooled}; vs {EXPORTED} max |diff| {self.max_abs_diff:.0e}")


class Optimize(Unit):
    """model.onnx -> model.opt.onnx: constant folding, shape inference, dead nodes, the last layer on the
    pooled token where the head reads one (export/optimize.py, export/pooled_rows.py)."""

    name = "optimize"
    needs = ("export",)
    primary = GRAPHS["fp32"]
    result_type = OptimizeResult

    def __init__(self, external_data_threshold: int | None = None):
        self.threshold = external_data_threshold or PROTOBUF_LIMIT

    def inputs(self, pipeline: Pipeline) -> dict[str, str]:
        # The export's record holds the sha256s of model.onnx (and its .data), just verified or written.
        return {"config": sha256_json(graph_view(pipeline.config))} | pipeline.work.record("export").outputs

    def options(self) -> dict[str, Any]:
        # "passes" names what the stage does beyond folding, so that work dirs optimized before a pass
        # existed are optimized again.
        return {"atol": OPTIMIZE_ATOL, "external_data_threshold": self.threshold, "passes": ["pooled_rows"]}

    def tools(self) -> dict[str, str]:
        return tool_versions()

    def produce(self, pipeline: Pipeline, scratch: Path) -> dict[str, Any]:
        from miaotui.export.optimize import compare_onnx, optimize_onnx
        from miaotui.export.parity import parity_sizes

        exported = pipeline.result("export").path
        report = optimize_onnx(exported, scratch / self.primary, self.threshold)
        report.max_abs_diff = compare_onnx(exported, scratch / self.primary, pipeline.config, parity_sizes(pipeline.config))
        return asdict(report)
