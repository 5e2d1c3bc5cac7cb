"""How many rows one call should take: for engines whose speed per row falls when a call gets large.

ONNX Runtime's CPU kernels run a graph op by op over whole tensors, and an INT8 transformer's float
passes between its INT8 MatMuls (GELU, smoothing's scales, quantize) are bound by memory once a
call's activations outgrow the caches. Measured on minilm-sentiment's INT8 engine (2 threads,
benchmarks/call_size.py, benchmarks/NOTES.md): at seq 128, 35.5 ms per 1k tokens in calls of 2k
tokens, 44.1 at 4k (batch 32), 50.8 at 8k (batch 64). Where the build measures a gain,
the sidecar's session settings record the most input elements one call may take
(`max_call_elements`), and `Engine.run` cuts larger batches into row slices under it (as it already
does past the engine's largest batch): rows are independent, so each row's answer is the same.
Written here: ONNX Runtime has no setting for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

# Budgets tried at build, in input elements per call (tokens for [batch, seq] inputs).
CANDIDATE_ELEMENTS = (4096, 2048, 1024)
# A split must beat whole calls by this much at the measured shape to be recorded: below it, timing
# noise on a busy machine could pick a split that gains nothing.
MIN_GAIN = 0.05
TIMING_ROUNDS = 3  # each candidate once a round (engines/timing.py): calls at the largest shape are slow

Run = Callable[[dict[str, np.ndarray]], object]


def rows_per_call(arrays: dict[str, object], max_elements: int) -> int:
    """How many rows of `arrays` (batch first) one call takes under `max_elements` (at least one)."""
    return rows_within(tuple(next(iter(arrays.values())).shape[1:]), max_elements)


def rows_within(row_shape: tuple[int, ...], max_elements: int) -> int:
    """How many rows of `row_shape` (the dims after the batch) fit in `max_elements` (at least one)."""
    per_row = int(np.prod(row_shape, dtype=np.int64))
    return max(1, max_elements // max(per_row, 1))


def row_slices(arrays: dict[str, object], rows: int | Sequence[int]) -> Iterator[dict[str, object]]:
    """`arrays` (batch first) cut into consecutive row ranges of at most `rows` rows, or of the given sizes."""
    total = len(next(iter(arrays.values())))
    sizes = [rows] * -(-total // rows) if isinstance(rows, int) else list(rows)
    start = 0
    for size in sizes:
        yield {name: array[start:start + size] for name, array in arrays.items()}
        start += size


def split_feed(ranges, config) -> dict[str, np.ndarray]:
    """What the build times the split at: the largest batch of the shape ranges, the rest of the shape at opt."""
    from dataclasses import replace

    from miaotui.engines.shapes import synthetic_feed

    return synthetic_feed([replace(r, opt=(r.max[0], *r.opt[1:])) for r in ranges], "opt", config)


def split_calls(run: Run, feed: dict[str, np.ndarray]) -> dict[str, Callable[[], object]]:
    """The ways to run `feed` the build compares: "whole" (one call) and each budget that splits it."""
    batch = len(next(iter(feed.values())))
    calls: dict[str, Callable[[], object]] = {"whole": lambda: run(feed)}
    for budget in CANDIDATE_ELEMENTS:
        rows = rows_per_call(feed, budget)
        if rows < batch:
            parts = list(row_slices(feed, rows))
            calls[str(budget)] = lambda parts=parts: [run(part) for part in parts]
    return calls


def measure_call_split(run: Run, feed: dict[str, np.ndarray]) -> tuple[int | None, dict[str, float], dict[str, float]]:
    """The budget (input elements per call) that runs `feed` fastest, None when whole calls are as fast
    (within MIN_GAIN); the milliseconds each took ("whole" and each budget that splits the feed); and each
    budget's time over whole calls', paired round by round (engines/timing.Interleaved.ratio), which decides."""
    from miaotui.engines.timing import interleaved

    calls = split_calls(run, feed)
    timed = interleaved(calls, TIMING_ROUNDS)
    milliseconds = {name: round(ms, 2) for name, ms in timed.ms().items()}
    to_whole = {name: round(timed.ratio(name, "whole"), 4) for name in calls if name != "whole"}
    if not to_whole:
        return None, milliseconds, to_whole
    best = min(to_whole, key=to_whole.get)
    return (int(best) if to_whole[best] <= 1 - MIN_GAIN else None), milliseconds, to_whole
