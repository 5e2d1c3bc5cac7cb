"""PyTorch -> ONNX (checked against PyTorch right after export), graph optimization, INT8 quantization."""

from miaotui.export.optimize import OptimizeReport, compare_onnx, optimize_onnx
from miaotui.export.parity import ParityResult, check_parity
from miaotui.export.stage import (ExportResult, Fp16Result, QuantizeOptions, QuantizeResult, StageResult, quantize_options,
                                  run_export_stage, run_fp16_stage, run_optimize_stage,
                                  run_quantize_stage)
from miaotui.export.torch_to_onnx import ExportOptions, export_to_onnx

__all__ = [
    "ExportOptions",
    "ExportResult",
    "Fp16Result",
    "OptimizeReport",
    "ParityResult",
    "QuantizeOptions",
    "QuantizeResult",
    "StageResult",
    "check_parity",
    "compare_onnx",
    "export_to_onnx",
    "optimize_onnx",
    "run_export_stage",
    "run_fp16_stage",
    "run_optimize_stage",
    "run_quantize_stage",
    "quantize_options",
]
