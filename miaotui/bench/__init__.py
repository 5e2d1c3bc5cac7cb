"""Latency and throughput of engines and of the PyTorch model, each timed in a process of its own."""

from miaotui.bench.run import Subject, run_bench
from miaotui.bench.report import write_bench_reports

__all__ = ["Subject", "run_bench", "write_bench_reports"]
