"""The pipeline: stages as units with declared inputs, run by one runner (make-like skipping, atomic
publishing), and the parity gate on what they built.

    from miaotui.stages import Pipeline, Build
    pipeline = Pipeline(config, "build/my-classifier")
    engine = pipeline.run(Build(BuildOptions(backend="onnxruntime")))   # export, optimize, quantize first
    for result in pipeline.ran: print(result.stage, result.check)

The run_*_stage functions are one-stage shortcuts over a fresh Pipeline.
"""

from __future__ import annotations

from pathlib import Path

from miaotui.config import Config
from miaotui.export.recipe import QuantizeOptions, quantize_options
from miaotui.export.torch_to_onnx import ExportOptions
from miaotui.stages.build import Build, BuildStageResult
from miaotui.stages.export import Export, ExportResult, Optimize, OptimizeResult
from miaotui.stages.gate import (FlowResult, GateResult, RunOptions, build_engines, config_for_engine, gate_built,
                                 gate_engine, validate_engine)
from miaotui.stages.quantize import Half, HalfResult, Quantize, QuantizeResult
from miaotui.stages.reference import Reference, ReferenceResult
from miaotui.stages.runner import Pipeline, StageResult, Unit

__all__ = [
    "Build", "BuildStageResult", "Export", "ExportOptions", "ExportResult", "FlowResult", "GateResult", "Half",
    "HalfResult", "Optimize", "OptimizeResult", "Pipeline", "Quantize", "QuantizeOptions", "QuantizeResult",
    "Reference", "ReferenceResult", "RunOptions", "StageResult", "Unit", "build_engines", "config_for_engine",
    "gate_built", "gate_engine", "quantize_options", "run_build_stage", "run_export_stage", "run_fp16_stage",
    "run_optimize_stage", "run_quantize_stage", "run_reference_stage", "validate_engine",
]


def run_export_stage(config: Config, work_dir: str | Path, options: ExportOptions | None = None, force: bool = False,
                     model=None) -> ExportResult:
    """model.onnx, unless the manifest says it is current."""
    return Pipeline(config, work_dir).run(Export(options, model), force)


def run_optimize_stage(config: Config, work_dir: str | Path, force: bool = False,
                       external_data_threshold: int | None = None) -> OptimizeResult:
    """model.opt.onnx, after export when stale; `force` redoes this stage only."""
    return Pipeline(config, work_dir).run(Optimize(external_data_threshold), force)


def run_quantize_stage(config: Config, work_dir: str | Path, options: QuantizeOptions | None = None,
                       force: bool = False, progress: bool = True) -> QuantizeResult:
    """model.int8.onnx (+ calibration.json, quantization.json), after export and optimize when stale."""
    return Pipeline(config, work_dir, progress).run(Quantize(options), force)


def run_fp16_stage(config: Config, work_dir: str | Path, precision: str = "fp16", force: bool = False,
                   progress: bool = True) -> HalfResult:
    """model.fp16.onnx or model.int8-fp16.onnx, after the stages before it when stale."""
    return Pipeline(config, work_dir, progress).run(Half(precision), force)


def run_build_stage(config: Config, work_dir: str | Path, options=None, force: bool = False,
                    progress: bool = True) -> BuildStageResult:
    """The engine for options.backend and options.precision (default int8), after the stages before it."""
    return Pipeline(config, work_dir, progress).run(Build(options), force)


def run_reference_stage(config: Config, work_dir: str | Path, force: bool = False, progress: bool = True,
                        model=None) -> ReferenceResult:
    """reference.npz: PyTorch's outputs on the validation split."""
    return Pipeline(config, work_dir, progress).run(Reference(model=model), force)
