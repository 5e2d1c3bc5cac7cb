"""bench.json, bench.md and bench.png (latency against batch size, one line per subject and sequence)."""

from __future__ import annotations

from pathlib import Path

from miaotui.artifacts import atomic_path, atomic_write_bytes, atomic_write_json
from miaotui.workdir import BENCH_REPORTS


def markdown(rows: list[dict], threads: int, machine: str) -> str:
    lines = [f"Latency and throughput, {threads} thread(s), {machine}. Each subject timed in its own process after a "
             "warm-up; p50/p90/p99 over the calls shown.", "",
             "| subject | batch | seq | p50 ms | p90 ms | p99 ms | samples/s | vs PyTorch | calls |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['name']} | {row['batch']} | {row['seq']} | {row['skipped']} | | | | | |")
            continue
        ratio = f"{row['vs_torch']:.2f}x" if "vs_torch" in row else ""
        lines.append(f"| {row['name']} | {row['batch']} | {row['seq']} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | "
                     f"{row['p99_ms']:.2f} | {row['samples_per_s']:.1f} | {ratio} | {row['calls']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    seqs = sorted({row["seq"] for row in rows})
    figure, axes = plt.subplots(1, len(seqs), figsize=(5.5 * len(seqs), 4), squeeze=False)
    for axis, seq in zip(axes[0], seqs):
        for name in dict.fromkeys(row["name"] for row in rows):
            points = sorted((r["batch"], r["p50_ms"]) for r in rows if r["name"] == name and r["seq"] == seq and "p50_ms" in r)
            if points:
                axis.plot(*zip(*points), marker="o", label=name)
        axis.set(title=f"seq {seq}", xlabel="batch size", ylabel="p50 latency (ms)", xscale="log", yscale="log")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as staged:
        figure.savefig(staged, format="png", dpi=110)
    plt.close(figure)


def machine_text() -> str:
    import os
    import platform

    from miaotui.engines.onnxruntime_backend import cpu_description

    cpu = cpu_description()
    return f"{cpu['cpu']}, {os.cpu_count()} cores, {platform.machine()}"


def write_bench_reports(rows: list[dict], folder: Path, threads: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    machine = machine_text()
    written = [folder / name for name in BENCH_REPORTS]
    atomic_write_json(written[0], {"threads": threads, "machine": machine, "rows": rows})
    atomic_write_bytes(written[1], markdown(rows, threads, machine).encode())
    plot(rows, written[2])
    return written
