"""Latency and throughput of engines and of the PyTorch model, each timed in a process of its own."""

from miaotui.bench.report import write_bench_reports
from miaotui.bench.run import Subject, default_report_dir, engine_subjects, run_bench, torch_subject

__all__ = ["Subject", "default_report_dir", "engine_subjects", "run_bench", "torch_subject", "write_bench_reports"]
