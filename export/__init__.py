"""Stage 1 of the flow: PyTorch -> ONNX, checked against PyTorch right after export."""

from miaotui.export.parity import ParityResult, check_parity
from miaotui.export.stage import ExportResult, run_export_stage
from miaotui.export.torch_to_onnx import ExportOptions, export_to_onnx

__all__ = ["ExportOptions", "ExportResult", "ParityResult", "check_parity", "export_to_onnx", "run_export_stage"]
