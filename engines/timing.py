"""Which of a few ways to run the same work is fastest here: the build's timing, on a machine that may be busy.

The benchmarks (miaotui/bench) time latency distributions in their own processes; a build only compares
a handful of forms of one engine in one process, and this is that comparison.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Above this share of the CPUs' time going to other processes, a timing is redone (interleaved) and,
# if it stays so, reported as made on a busy machine. A quiet machine here: under 2%; one other process
# spinning on one of two CPUs: about 50% (tests/test_engines.py, benchmarks/NOTES.md).
BUSY_ELSEWHERE_WARNING = 0.2
QUIET_ATTEMPTS = 3
QUIET_PAUSE_S = 1.0
_ledger: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar("miaotui_timing_ledger", default=None)


@contextlib.contextmanager
def timing_ledger() -> Iterator[list[float]]:
    """Collects, for the block (a build), the busy-elsewhere share of each timing it decided by."""
    shares: list[float] = []
    token = _ledger.set(shares)
    try:
        yield shares
    finally:
        _ledger.reset(token)


def record_busy(share: float | None) -> None:
    """Put a timing's busy-elsewhere share in the open ledger (nothing when none is open)."""
    shares = _ledger.get()
    if shares is not None and share is not None:
        shares.append(share)


@dataclass(frozen=True)
class Interleaved:
    """The milliseconds per call of each candidate in each round of one interleaved comparison."""

    rounds: dict[str, np.ndarray]

    def ms(self) -> dict[str, float]:
        """Each candidate's median milliseconds per call (what the sidecars record)."""
        return {name: float(np.median(values)) for name, values in self.rounds.items()}

    def ratio(self, name: str, baseline: str) -> float:
        """`name`'s time over `baseline`'s, the median of the two's ratio within each round: the rounds pair
        calls made next to each other, so a slow spell that covers some rounds cancels in each ratio, where it
        moves one candidate's median and not the other's. (What it gains is modest: benchmarks/build_decisions.py
        on a Zen 5 put the spread within a process at 0.0034-0.0050 paired against 0.0058-0.0087 in one run,
        level in the next; across processes the process's own placement dominates, benchmarks/NOTES.md.)"""
        return float(np.median(self.rounds[name] / self.rounds[baseline]))


def interleaved(calls: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1,
                attempts: int = QUIET_ATTEMPTS) -> Interleaved:
    """Each call's milliseconds in each of `rounds` rounds, every round calling each once, the order
    reversed every other round: a shared machine's drift then lands on all of them alike, where timing
    one after another credits it to whichever ran in a quiet spell. Each is first called `warmup` times
    (a first call on new shapes pays for their setup). Rounds during which other processes kept the CPUs
    busy (cpu_use, above BUSY_ELSEWHERE_WARNING) are timed again after a pause, up to `attempts` times
    in all, and the quietest attempt counts (its share goes to the open timing_ledger): contention is
    not drift, it can favour one candidate (few large calls over many small ones)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    kept: dict[str, np.ndarray] = {}
    kept_busy: float | None = None
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(QUIET_PAUSE_S)
        with cpu_use() as use:
            timed = round_ms(calls, rounds)
        busy = use.busy_elsewhere
        if not kept or (busy is not None and busy < kept_busy):
            kept, kept_busy = timed, busy
        if busy is None or busy <= BUSY_ELSEWHERE_WARNING:  # None: the kernel does not say (not Linux)
            break
    record_busy(kept_busy)
    return Interleaved(kept)


def round_ms(calls: Mapping[str, Callable[[], object]], rounds: int, block: int = 1,
             settle: int = 0) -> dict[str, np.ndarray]:
    """Milliseconds per call of each call in each of `rounds` rounds, the order reversed every other round
    (interleaved's rounds, kept per round so that two calls' times can be paired round by round). Each
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


@dataclass
class CpuUse:
    """What share of this process's CPUs' time went to other processes (and to the hypervisor's steal)
    while a block ran; None where the kernel does not say (not Linux)."""

    busy_elsewhere: float | None = None


def _cpu_ticks(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks of `cpus` since boot, from /proc/stat's per-CPU lines; None where unreadable."""
    busy = total = 0
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        # user nice system idle iowait irq softirq steal (guest time is already inside user and nice)
        ticks = [int(value) for value in fields[:8]]
        busy += sum(ticks) - ticks[3] - ticks[4]
        total += sum(ticks)
    return (busy, total) if total else None


@contextlib.contextmanager
def cpu_use() -> Iterator[CpuUse]:
    """Measure how busy other processes kept this process's CPUs during the block: the kernel's busy ticks
    on the CPUs this process may run on, less this process's own CPU time. Written here because neither
    psutil (not a dependency) nor the libraries' own timing say it: a build's timing on a shared machine
    decides call forms that last as long as the engine."""
    import os

    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        cpus = set()
    before, own_before = _cpu_ticks(cpus), os.times()
    use = CpuUse()
    yield use
    after, own_after = _cpu_ticks(cpus), os.times()
    if before is None or after is None or after[1] <= before[1]:
        return
    hz = os.sysconf("SC_CLK_TCK")
    busy = (after[0] - before[0]) / hz
    own = sum(getattr(own_after, key) - getattr(own_before, key)
              for key in ("user", "system", "children_user", "children_system"))
    capacity = (after[1] - before[1]) / hz  # every tick of these CPUs over the block, idle ones included
    use.busy_elsewhere = round(min(1.0, max(0.0, (busy - own) / capacity)), 3)
