"""PyTorch -> ONNX (checked against PyTorch right after export), graph optimization, INT8 and FP16
graphs. Pure computation on files; the stages that run it in a work dir are miaotui.stages."""

from miaotui.export.optimize import OptimizeReport, compare_onnx, optimize_onnx
from miaotui.export.parity import ParityResult, check_parity
from miaotui.export.recipe import QuantizeOptions, quantize_options
from miaotui.export.torch_to_onnx import ExportOptions, export_to_onnx

__all__ = [
    "ExportOptions",
    "OptimizeReport",
    "ParityResult",
    "QuantizeOptions",
    "check_parity",
    "compare_onnx",
    "export_to_onnx",
    "optimize_onnx",
    "quantize_options",
]
