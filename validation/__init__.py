"""Reference outputs, parity metrics, thresholds, reports: the CI gate on an engine."""

from miaotui.validation.gate import ParityReport, validate_engine
from miaotui.validation.metrics import OutputMetrics, output_metrics
from miaotui.validation.report import write_reports
from miaotui.validation.thresholds import DEFAULT_BARS, Check

__all__ = ["Check", "DEFAULT_BARS", "OutputMetrics", "ParityReport", "output_metrics", "validate_engine", "write_reports"]
