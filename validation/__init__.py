"""Parity metrics, thresholds and reports: the CI gate's judgement of an engine against PyTorch
(the gate itself, with the reference stage, is miaotui.stages.validate_engine)."""

from miaotui.validation.gate import ParityReport, check_engine_matches_config, compare_engine
from miaotui.validation.metrics import OutputMetrics, output_metrics
from miaotui.validation.report import write_reports
from miaotui.validation.thresholds import DEFAULT_BARS, Check

__all__ = ["Check", "DEFAULT_BARS", "OutputMetrics", "ParityReport", "check_engine_matches_config", "compare_engine",
           "output_metrics", "write_reports"]
