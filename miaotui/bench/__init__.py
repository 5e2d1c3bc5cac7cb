"""Latency and throughput of engines and of the PyTorch model, each timed in a process of its own."""

from miaotui.bench.report import write_bench_reports
from miaotui.bench.run import (MIN_STEADY_CALLS, Subject, default_report_dir, engine_subjects, run_bench,
                               torch_subject, unsteady)

__all__ = ["MIN_STEADY_CALLS", "Subject", "default_report_dir", "engine_subjects", "run_bench", "torch_subject",
           "unsteady", "write_bench_reports"]
