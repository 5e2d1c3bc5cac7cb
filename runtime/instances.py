"""How many threads one copy of an engine takes when a server runs several copies of a model side by
side (Triton's instance_group on the CPU: each instance a process with its own thread pool)."""

from __future__ import annotations

import os

EXPECTED = "expected auto, default or a positive number of threads"


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def instance_threads(setting: str, instances: int, cpus: int | None = None) -> int | None:
    """Threads for one of `instances` copies: "auto" divides the CPUs among them (at least one each;
    one instance keeps the engine's own default, None), "default" is always the engine's default (every
    instance then sizes its pool for the whole machine: with 2 instances on 2 CPUs the served
    minilm-sentiment answered 30-40% fewer texts/s than with 1 thread each, benchmarks/NOTES.md), and a
    positive number is that many. ValueError names the setting otherwise."""
    if setting == "default":
        return None
    if setting == "auto":
        return None if instances <= 1 else max(1, (cpus or available_cpus()) // instances)
    if setting.isdigit() and int(setting) > 0:
        return int(setting)
    raise ValueError(f"engine_threads {setting!r}: {EXPECTED}")
