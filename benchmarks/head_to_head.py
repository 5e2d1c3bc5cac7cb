"""The openvino engine against NNCF's INT8 IRs, paired: the subjects take turns call by call, in fresh processes.

    python benchmarks/head_to_head.py [--model minilm-sentiment] [--batch 1,32] [--seq 128] [--threads 2]
                                      [--seconds 20] [--block 4] [--processes 8] [--peers-in-streams]
                                      [--engine ENGINE.xml]

peers.py times each peer in its own process in slices of about a second: on the shared machines here the
machine's speed drifts between slices by more than these engines differ (per-round ratios 0.79 to 1.07 in
one run), so its medians cannot say which of two engines within 5% of each other is faster. Here the
subjects are compiled in one process and take turns in cycles (the order reversed every other cycle):
each turn makes one call that is not timed (the subject's weights back in the caches after the other's
calls) and then `--block` timed calls, and the ratio engine / peer is taken within each cycle, so drift
cancels. But one process is not enough either: two such runs minutes apart gave 0.93 and 1.05-1.10 at
batch 32, each with a 95% interval a few thousandths wide (benchmarks/NOTES.md, sixteenth session): how a
process's memory and threads land costs each compiled model differently, and the cost lasts as long as
the process. So the paired run is repeated in `--processes` fresh processes, one after another, and the
table gives the median of their ratios, the lowest and highest, and in how many the engine was faster.
What a process compiles first can run slower than what follows it, so the engine is loaded first in every
other process and last in the rest; a second copy of the engine takes turns too, as a control (its ratio
should be 1: how far it strays is the table's noise).
The peers run as peers.py runs them (the CPU plugin's defaults, `--threads` threads); the engine through
the miaotui runtime (Engine.run), as a user calls it. With `--peers-in-streams` each NNCF IR also runs as
the engine runs a batch where its build chose streams (its rows split across the CPU plugin's THROUGHPUT
streams, one part per stream at once; one row as one call), in the plugin's default precision: what the
engine's graph gains over NNCF's, without what its way of running a call gains.

`--engine` compares another openvino engine of the same model (one built with other forms, `miaotui build
build/<model>/model.int8.onnx --backend openvino --openvino-attention float -o variant.xml`) instead of the
work dir's, which is otherwise built if missing.

Writes benchmarks/results/<model>/head_to_head.{json,md}, or head_to_head.<engine file's stem>.{json,md} with
`--engine`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP_SAMPLES = 2000
CONTROL = "the engine, a second copy (control)"


def summary(ms: dict[str, np.ndarray], engine: str, seed: int = 0) -> dict[str, dict]:
    """For each peer: both medians (ms), the paired ratio's median, its 95% bootstrap interval, the share of
    cycles the engine was faster."""
    rng = np.random.default_rng(seed)
    rows = {}
    for name, values in ms.items():
        if name == engine:
            continue
        ratios = ms[engine] / values
        medians = np.median(rng.choice(ratios, (BOOTSTRAP_SAMPLES, len(ratios))), axis=1)
        rows[name] = {"engine_ms": round(float(np.median(ms[engine])), 3), "peer_ms": round(float(np.median(values)), 3),
                      "ratio": round(float(np.median(ratios)), 4),
                      "interval": [round(float(np.percentile(medians, 2.5)), 4), round(float(np.percentile(medians, 97.5)), 4)],
                      "engine_faster": round(float((ratios < 1).mean()), 3), "cycles": len(ratios)}
    return rows


def in_streams(path: Path, threads: int) -> tuple:
    """(call, input names) of the IR at `path` run by the openvino engine's runner with streams, in the CPU
    plugin's default precision (as the peer runs): a batch of a row per stream or more split across them."""
    from miaotui.engines.openvino_backend import OpenVINORunner, read_ir

    core, model = read_ir(path, path.with_suffix(".bin"))
    default = core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    runner = OpenVINORunner(core, model, path, default, threads, [model.outputs[0].get_any_name()],
                            split_from_rows=2)
    return runner.run, {port.get_any_name() for port in model.inputs}


def one_process(args) -> dict:
    """The paired cycles in this process: {shape: {peer: summary row}}."""
    from peers import nncf_int8, paired_ms  # this folder's peer recipes: the same IRs as peers.py's table

    from miaotui.bench.worker import _runner
    from miaotui.engines.shapes import synthetic_feed
    from miaotui.models import resolve_config
    from miaotui.runtime import Engine

    config = resolve_config(args.model)
    work = REPO / "build" / config.name
    peers = {"nncf int8 (openvino, defaults)": nncf_int8(config, work),
             "nncf int8 transformer (openvino)": nncf_int8(config, work, transformer=True)}

    def load_peers() -> dict:
        """name -> (call, the input names it takes), compiled as peers.py's workers compile them (and, with
        --peers-in-streams, as the engine's runner runs a batch in streams)."""
        loaded = {}
        for name, path in peers.items():
            call, specs, *_ = _runner({"kind": "openvino", "path": str(path), "threads": args.threads})
            loaded[name] = call, {spec[0] for spec in specs}
            if args.peers_in_streams:
                loaded[f"{name.removesuffix(')')}, split across streams)"] = in_streams(path, args.threads)
        return loaded

    # What is compiled first ran about 2% slower at batch 32 than a copy compiled after it in one /tmp A/B of eight
    # processes (not in six later ones, benchmarks/NOTES.md): the engine is loaded first in every other process,
    # last in the others, which costs nothing where there is no such effect.
    requests = {} if args.engine_first else load_peers()
    engine = Engine.load(args.engine, threads=args.threads)
    control = Engine.load(args.engine, threads=args.threads)  # a second copy: how far the same engine differs from itself
    requests = requests or load_peers()
    results = {}
    for batch in [int(b) for b in args.batch.split(",")]:
        ranges = [replace(t, opt=(batch, args.seq)) for t in engine.inputs]
        feed = synthetic_feed(ranges, "opt", config)
        calls = {"engine": lambda feed=feed: engine.run(feed), CONTROL: lambda feed=feed: control.run(feed)}
        for name, (call, names) in requests.items():
            calls[name] = lambda call=call, peer_feed={k: v for k, v in feed.items() if k in names}: call(peer_feed)
        results[f"b{batch} s{args.seq}"] = summary(paired_ms(calls, args.seconds, args.block), "engine")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-sentiment")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0, help="timing budget per batch size and process")
    parser.add_argument("--block", type=int, default=4, help="timed calls per turn")
    parser.add_argument("--processes", type=int, default=8, help="fresh processes, one after another")
    parser.add_argument("--peers-in-streams", action="store_true",
                        help="also run each NNCF IR with its batch rows split across streams, as the engine may")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine-first", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help="an openvino engine file of the model to compare instead of the work dir's")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(one_process(args)))
        return

    from peers import describe_machine, fresh_workers, nncf_int8

    from miaotui.engines import BuildOptions
    from miaotui.models import resolve_config
    from miaotui.stages import run_build_stage

    config = resolve_config(args.model)
    work = REPO / "build" / config.name
    if args.engine:
        engine_path = Path(args.engine)
        if not engine_path.is_file():
            raise SystemExit(f"head_to_head.py: --engine {engine_path}: no such file")
    else:
        engine_path = run_build_stage(config, work, BuildOptions(backend="openvino")).path
    for transformer in (False, True):  # made once, before the workers
        nncf_int8(config, work, transformer=transformer)
    started = time.time()
    # the engine loaded first in every other process
    worker_args = [["--engine", str(engine_path), *(["--engine-first"] if index % 2 == 0 else [])]
                   for index in range(args.processes)]
    runs = fresh_workers(__file__, worker_args, "benchmarks/head_to_head.py", progress=lambda run: "; ".join(
        f"{shape} {name.split(' (')[0]} {row['ratio']:.3f}" for shape, rows in run.items() for name, row in rows.items()))
    cpu, machine = describe_machine()
    command = (f"python benchmarks/head_to_head.py --model {config.name} --batch {args.batch} --seq {args.seq} "
               f"--threads {args.threads} --seconds {args.seconds:g} --block {args.block} --processes {args.processes}"
               + (" --peers-in-streams" if args.peers_in_streams else "") + (f" --engine {args.engine}" if args.engine else ""))
    lines = [f"{config.name}, the openvino engine (`{engine_path.name}`) against NNCF's INT8 IRs, paired within each of "
             f"{args.processes} fresh processes, {args.threads} threads: `{command}` ({time.time() - started:.0f} s). "
             f"{machine}.", "",
             "Ratio: the engine's ms / the peer's ms within a cycle, its median in each process (under 1: the engine "
             "faster); across the processes: their median, the lowest and highest, in how many the engine was faster, "
             "and the widest 95% interval one process gave itself.", "",
             "| shape | peer | engine ms | peer ms | ratio, median of processes [lowest, highest] | engine faster in "
             "| one process's widest interval |", "|---|---|---|---|---|---|---|"]
    table = {}
    for shape in runs[0]:
        for name in runs[0][shape]:
            rows = [run[shape][name] for run in runs]
            ratios = np.array([row["ratio"] for row in rows])
            widest = max(rows, key=lambda row: row["interval"][1] - row["interval"][0])["interval"]
            table.setdefault(shape, {})[name] = {
                "engine_ms": float(np.median([row["engine_ms"] for row in rows])),
                "peer_ms": float(np.median([row["peer_ms"] for row in rows])), "ratio": float(np.median(ratios)),
                "lowest": float(ratios.min()), "highest": float(ratios.max()), "engine_faster": int((ratios < 1).sum()),
                "widest_interval": widest, "ratios": ratios.tolist()}
            row = table[shape][name]
            lines.append(f"| {shape} | {name} | {row['engine_ms']:.2f} | {row['peer_ms']:.2f} | {row['ratio']:.3f} "
                         f"[{row['lowest']:.3f}, {row['highest']:.3f}] | {row['engine_faster']} of {len(ratios)} "
                         f"| [{widest[0]:.3f}, {widest[1]:.3f}] |")
    out = REPO / "benchmarks" / "results" / config.name
    out.mkdir(parents=True, exist_ok=True)
    stem = f"head_to_head.{engine_path.name.removesuffix('.xml')}" if args.engine else "head_to_head"
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "cpu": cpu, "engine": engine_path.name,
                                                  "table": table, "processes": runs}, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
