"""PyTorch -> ONNX (checked against PyTorch right after export) and graph optimization."""

from miaotui.export.optimize import OptimizeReport, compare_onnx, optimize_onnx
from miaotui.export.parity import ParityResult, check_parity
from miaotui.export.stage import ExportResult, StageResult, run_export_stage, run_optimize_stage
from miaotui.export.torch_to_onnx import ExportOptions, export_to_onnx

__all__ = [
    "ExportOptions",
    "ExportResult",
    "OptimizeReport",
    "ParityResult",
    "StageResult",
    "check_parity",
    "compare_onnx",
    "export_to_onnx",
    "optimize_onnx",
    "run_export_stage",
    "run_optimize_stage",
]
