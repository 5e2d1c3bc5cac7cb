"""Large batches in row chunks: for engines whose speed per row falls when one call gets too large.

ONNX Runtime's CPU kernels run a graph op by op over whole tensors, and an INT8 transformer's float
passes between its INT8 MatMuls (GELU, smoothing's scales, quantize) are bound by memory once a
call's activations outgrow the caches. Measured on minilm-sentiment's INT8 engine (2 threads,
benchmarks/NOTES.md): 36 ms per 1k tokens at 1-3k tokens a call, 41 at 4k (batch 32 x seq 128),
54 at 8k (batch 64), whatever the mix of batch and sequence length. Where the build measures a gain,
the sidecar records the most input elements one call may take (`max_call_elements`) and the runner
splits larger batches into row chunks under it: the rows are independent, so the answer is the same
per row. Written here: ONNX Runtime has no setting for it, and the batch axis is the engine's own
contract (every input and output's first dimension, one symbolic name).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

# Budgets tried at build, in input elements per call (tokens for [batch, seq] inputs).
CANDIDATE_ELEMENTS = (4096, 2048, 1024)
# A split must beat whole calls by this much at the measured shape to be recorded: below it, timing
# noise on a busy machine could pick a split that gains nothing.
MIN_GAIN = 0.05
TIMING_REPEATS = 3

Run = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def batch_axis_shared(shapes: list[tuple]) -> bool:
    """Whether every shape (each input's and output's dims) starts with one symbolic dimension, the batch."""
    firsts = {tuple(dims)[0] if len(dims) else None for dims in shapes}
    return len(firsts) == 1 and isinstance(next(iter(firsts)), str)


def rows_per_call(feed: dict[str, np.ndarray], max_elements: int) -> int:
    """How many rows of `feed` one call takes under `max_elements` (at least one)."""
    first = next(iter(feed.values()))
    per_row = int(np.prod(first.shape[1:], dtype=np.int64)) if first.ndim > 1 else 1
    return max(1, max_elements // max(per_row, 1))


def run_in_chunks(run: Run, feed: dict[str, np.ndarray], max_elements: int) -> list[np.ndarray]:
    """`run(feed)`, in row chunks when the batch is larger than one call should take."""
    batch = len(next(iter(feed.values())))
    rows = rows_per_call(feed, max_elements)
    if batch <= rows:
        return run(feed)
    parts = [run({name: array[start:start + rows] for name, array in feed.items()}) for start in range(0, batch, rows)]
    return [np.concatenate([part[index] for part in parts]) for index in range(len(parts[0]))]


def _seconds(call: Callable[[], object]) -> float:
    call()  # a first call on new shapes pays for their setup
    best = float("inf")
    for _ in range(TIMING_REPEATS):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def measure_call_split(run: Run, feed: dict[str, np.ndarray]) -> tuple[int | None, dict[str, float]]:
    """The budget (input elements per call) that runs `feed` fastest, None when whole calls are as fast
    (within MIN_GAIN), and the milliseconds each took ("whole" and each tried budget)."""
    first = next(iter(feed.values()))
    total = int(first.size)
    timings = {"whole": _seconds(lambda: run(feed)) * 1000}
    for budget in CANDIDATE_ELEMENTS:
        if budget < total and rows_per_call(feed, budget) < len(first):
            timings[str(budget)] = _seconds(lambda: run_in_chunks(run, feed, budget)) * 1000
    best = min(timings, key=timings.get)
    if best == "whole" or timings[best] > (1 - MIN_GAIN) * timings["whole"]:
        return None, {k: round(v, 2) for k, v in timings.items()}
    return int(best), {k: round(v, 2) for k, v in timings.items()}
