"""How steady the build's timing decisions are: each comparison repeated, read two ways.

    python benchmarks/build_decisions.py [--model minilm-sentiment] [--repeats 8] [--processes 6]

A build decides a few things by timing (engines/timing.py), and what it decides lasts as long as the engine:
the openvino build keeps self-attention in INT8 where that form is at least ATTENTION_MIN_GAIN faster than the
float one over the opt shape and 32 rows (engines/openvino_backend.py), and the onnxruntime build cuts large
batches into row slices where a slice budget is at least MIN_GAIN faster than whole calls
(engines/call_split.py). Here each comparison is made `--repeats` times in each of `--processes` fresh
processes, with the build's own candidates, shapes, rounds and retries (the work dir's model.int8.onnx and
onnxruntime engine, as `miaotui run` leaves them in build/<model>), and each repeat is read as the build reads
it (the median over the rounds of the candidate's time over the baseline's within a round,
engines/timing.Interleaved.ratio) and as builds read it before (the ratio of the two medians). The standard
deviation over the repeats is how far one build's reading moves from the next one's; the share of repeats
past the rule is how often a build would take the candidate.

Writes benchmarks/results/<model>/build_decisions.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# How a repeat is read: as the build reads it (the median of the per-round ratios); as builds read it before
# (the ratio of the medians).
READINGS = ("paired", "medians")


def _readings(timed, name: str, baseline: str) -> dict[str, float]:
    medians = timed.ms()
    return {"paired": timed.ratio(name, baseline), "medians": medians[name] / medians[baseline]}


def attention_decision(config, work: Path, repeats: int) -> list[dict[str, float]]:
    """The openvino build's attention comparison, `repeats` times: the INT8 form's time over the float
    form's, the geometric mean over the opt shape and LARGE_BATCH rows, each way of reading it."""
    import openvino as ov

    from miaotui.engines import openvino_backend as backend
    from miaotui.engines.shapes import resolve_shapes
    from miaotui.engines.timing import interleaved
    from miaotui.export.inspect_onnx import summarize_onnx

    onnx_path = work / "model.int8.onnx"
    summary = summarize_onnx(onnx_path)
    ranges = resolve_shapes(summary.inputs, config, ())
    hint = backend.float_precision(ov, "auto", summary.precision)
    blocks, graph = backend._attention_blocks(onnx_path, "auto", summary.precision)
    if not blocks:
        sys.exit(f"error: {onnx_path} records no attention blocks: nothing to compare")
    model = backend._convert(ov, onnx_path, ranges)
    backend._keep_reductions_unfused(model)
    with tempfile.TemporaryDirectory() as folder:
        int8_form = backend._with_int8_attention(ov, graph, onnx_path, blocks, ranges, Path(folder))
    forms = {"float": model, "int8": int8_form}
    calls = [(backend.form_calls(ov, forms, hint, feed), rounds) for _, feed, rounds in backend.timed_shapes(ranges, config)]
    readings = []
    for _ in range(repeats):
        per_shape = [_readings(interleaved(shape_calls, rounds, warmup=2), "int8", "float") for shape_calls, rounds in calls]
        readings.append({reading: backend.geometric_mean([r[reading] for r in per_shape]) for reading in READINGS})
    return readings


def call_split_decision(config, work: Path, repeats: int) -> list[dict[str, float]]:
    """The onnxruntime build's call-split comparison on the work dir's engine, `repeats` times: the best slice
    budget's time over whole calls', each way of reading it."""
    from miaotui.engines import read_metadata
    from miaotui.engines.call_split import TIMING_ROUNDS, split_calls, split_feed
    from miaotui.engines.onnxruntime_backend import _session
    from miaotui.engines.timing import interleaved

    engine = work / "engines" / f"{config.name}.onnxruntime.int8.ort"
    metadata = read_metadata(engine)
    session = _session(engine, metadata.session, engine_format=True)
    calls = split_calls(lambda arrays: session.run(None, arrays), split_feed(metadata.inputs, config))
    readings = []
    for _ in range(repeats):
        timed = interleaved(calls, TIMING_ROUNDS)
        budgets = [_readings(timed, name, "whole") for name in calls if name != "whole"]
        readings.append({reading: min(b[reading] for b in budgets) for reading in READINGS})
    return readings


def one_process(args) -> dict:
    from miaotui.models import resolve_config

    config = resolve_config(args.model)
    work = REPO / "build" / config.name
    return {"attention": attention_decision(config, work, args.repeats),
            "call_split": call_split_decision(config, work, args.repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-sentiment")
    parser.add_argument("--repeats", type=int, default=8, help="comparisons per process")
    parser.add_argument("--processes", type=int, default=6, help="fresh processes, one after another")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(one_process(args)))
        return

    from peers import describe_machine, fresh_workers  # this folder's

    from miaotui.engines.call_split import MIN_GAIN
    from miaotui.engines.openvino_backend import ATTENTION_MIN_GAIN
    from miaotui.models import resolve_config

    config = resolve_config(args.model)
    started = time.time()
    runs = fresh_workers(__file__, [[] for _ in range(args.processes)], "benchmarks/build_decisions.py",
                         progress=lambda run: "; ".join(f"{d} mean {np.mean([r['paired'] for r in rows]):.4f}"
                                                        for d, rows in run.items()))
    cpu, machine = describe_machine()
    command = f"python benchmarks/build_decisions.py --model {config.name} --repeats {args.repeats} --processes {args.processes}"
    lines = [f"{config.name}, the build's timing decisions repeated {args.repeats} times in each of {args.processes} fresh "
             f"processes: `{command}` ({time.time() - started:.0f} s). {machine}.", "",
             "Each repeat's ratio read as the build reads it (paired: the median of the per-round ratios) and as builds "
             "read it before (the ratio of the medians): mean, standard deviation over all repeats, the largest spread within one "
             "process, the lowest and highest, and how many repeats would keep the candidate.", "",
             "| decision | rule | reading | mean | sd | sd within a process (largest) | lowest | highest | candidate kept in |",
             "|---|---|---|---|---|---|---|---|---|"]
    table = {}
    for decision, label, gain in (("attention", "INT8 attention / float", ATTENTION_MIN_GAIN),
                                  ("call_split", "best slice budget / whole calls", MIN_GAIN)):
        for reading in READINGS:
            per_process = [np.array([r[reading] for r in run[decision]]) for run in runs]
            values = np.concatenate(per_process)
            row = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)),
                   "sd_within_largest": float(max(p.std(ddof=1) for p in per_process)),
                   "lowest": float(values.min()), "highest": float(values.max()),
                   "kept": int((values <= 1 - gain).sum()), "repeats": len(values), "min_gain": gain,
                   "values": [p.round(4).tolist() for p in per_process]}
            table.setdefault(decision, {})[reading] = row
            lines.append(f"| {label} | <= {1 - gain:.2f} | {reading} | {row['mean']:.4f} | {row['sd']:.4f} | "
                         f"{row['sd_within_largest']:.4f} | {row['lowest']:.4f} | {row['highest']:.4f} | "
                         f"{row['kept']} of {row['repeats']} |")
    out = REPO / "benchmarks" / "results" / config.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "build_decisions.json").write_text(json.dumps({"command": command, "cpu": cpu, "table": table}, indent=2) + "\n")
    (out / "build_decisions.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
