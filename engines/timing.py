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
    return {name: float(np.median(values)) for name, values in round_ms(calls, rounds).items()}


def round_ms(calls: Mapping[str, Callable[[], object]], rounds: int, block: int = 1,
             settle: int = 0) -> dict[str, np.ndarray]:
    """Milliseconds per call of each call in each of `rounds` rounds, the order reversed every other round
    (interleaved_ms's rounds, kept per round so that two calls' times can be paired round by round). Each
    turn makes `settle` untimed calls (its data back in the caches after the others' turns) and then
    `block` timed ones."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            call = calls[name]
            for _ in range(settle):
                call()
            started = time.perf_counter()
            for _ in range(block):
                call()
            times[name].append((time.perf_counter() - started) * 1000 / block)
    return {name: np.array(values) for name, values in times.items()}
