"""Which of a few ways to run the same work is fastest here: the build's timing, on a machine that may be busy.

The benchmarks (miaotui/bench) time latency distributions in their own processes; a build only compares
a handful of forms of one engine in one process, and this is that comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np


def interleaved_ms(calls: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds of each call over `rounds` rounds, every round calling each once, the order
    reversed every other round: a shared machine's drift then lands on all of them alike, where timing
    one after another credits it to whichever ran in a quiet spell. Each is first called `warmup` times
    (a first call on new shapes pays for their setup)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            started = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(values)) * 1000 for name, values in times.items()}
