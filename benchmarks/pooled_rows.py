"""The last layer on the pooled token only (export/pooled_rows.py): each INT8 engine with and without it.

    python benchmarks/pooled_rows.py [--out build/hf-minilm] [--stack-layers N] [--backends onnxruntime,openvino]
                                     [--batch 1,32] [--seq 128] [--threads 2] [--seconds 10] [--processes 3]

Takes the fine-tuned checkpoint that benchmarks/huggingface_finetune.py leaves in --out (its config
and its work dir, whose engines have the narrowing) and builds the same engines again in
<out>/work-all-rows with the narrowing turned off: the same export, calibration texts, quantization
and build. Then, for each backend, the two engines take turns call by call in one process (the
order reversed every other turn, engines/timing.round_ms) and the ratio all-rows / narrowed is taken
turn by turn, in `--processes` fresh processes (a process's memory placement costs each engine
differently, benchmarks/NOTES.md); and both engines' labels through Classifier.predict are compared
with the checkpoint's own on the validation and test splits. Writes
benchmarks/results/hf-minilm/pooled_rows.{json,md}.

`--stack-layers N` times a deeper encoder of the same width instead: a checkpoint whose N layers are
the fine-tuned one's repeated in order (0-5, 0-5 for 12), written with the same CSV files and its
config to <out>-N-layers (results in benchmarks/results/hf-minilm-N-layers/). Its answers are not a
trained model's, so its agreement says only that both engines answer alike; the times are a
deeper model's (nothing downloads a pretrained one here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from huggingface_finetune import CONFIG_FILE as CONFIG, checkpoint_predictions, init_config  # this folder's

REPO = Path(__file__).resolve().parents[1]
KINDS = ("narrowed", "all rows")


def one_process(args) -> dict:
    """{backend: {shape: ms of each kind and the all-rows / narrowed ratio, medians over the turns}}."""
    from peers import paired_ms  # this folder's

    from miaotui.config import load_config
    from miaotui.engines.call_split import rows_per_call
    from miaotui.engines.shapes import synthetic_feed
    from miaotui.runtime import Engine

    config = load_config(args.out / CONFIG)
    paths = json.loads(args.engines)
    results = {}
    for backend in args.backends.split(","):
        engines = {kind: Engine.load(paths[backend][kind], threads=args.threads) for kind in KINDS}
        for batch in [int(b) for b in args.batch.split(",")]:
            ranges = [replace(t, opt=(batch, args.seq)) for t in engines["narrowed"].inputs]
            feed = synthetic_feed(ranges, "opt", config)
            # Both engines take the narrowed one's rows per call: each onnxruntime build times its own call split
            # (engines/call_split.py), and two builds of near-equal graphs can pick different ones on a noisy
            # machine; the pass, not that pick, is what is measured here.
            budget = engines["narrowed"].max_call_elements
            rows = rows_per_call(feed, budget) if budget else batch
            calls = {kind: (lambda engine=engine: engine.run(feed, batch_size=rows)) for kind, engine in engines.items()}
            ms = paired_ms(calls, args.seconds, block=2)
            results.setdefault(backend, {})[f"{batch} x {args.seq}"] = {
                **{kind: round(float(np.median(ms[kind])), 3) for kind in KINDS},
                "ratio": round(float(np.median(ms["all rows"] / ms["narrowed"])), 4), "rounds": len(ms["narrowed"]),
                "rows_per_call": rows}
    return results


def stacked_folder(out: Path, layers: int) -> Path:
    return out.with_name(f"{out.name}-{layers}-layers")


def stack_layers(out: Path, layers: int) -> Path:
    """<out>-<layers>-layers: the checkpoint in <out> with its encoder layers repeated in order up to `layers`,
    the same CSV files, and a config named after the folder. Made afresh each time (a few seconds)."""
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    target = stacked_folder(out, layers)
    source = BertForSequenceClassification.from_pretrained(out / "checkpoint")
    depth = source.config.num_hidden_layers
    model = BertForSequenceClassification(BertConfig.from_pretrained(out / "checkpoint", num_hidden_layers=layers))
    weights = source.state_dict()

    def source_name(name: str) -> str:  # bert.encoder.layer.<i>.… reads layer i modulo the source's depth
        parts = name.split(".")
        if "layer" in parts:
            index = parts.index("layer") + 1
            parts[index] = str(int(parts[index]) % depth)
        return ".".join(parts)

    model.load_state_dict({name: weights[source_name(name)] for name in model.state_dict()})
    model.save_pretrained(target / "checkpoint")
    shutil.copy(out / "checkpoint" / "tokenizer.json", target / "checkpoint")
    for name in ("calibration.csv", "validation.csv", "test.csv"):
        shutil.copy(out / name, target / name)
    init_config(target, target.name)
    return target


def build_both(out: Path, backends: list[str]) -> dict[str, dict[str, str]]:
    """{backend: {kind: engine path}}: the narrowed engines in <out>/work, the others in <out>/work-all-rows."""
    import miaotui.export.pooled_rows as pooled_rows
    from miaotui.config import load_config
    from miaotui.engines import BuildOptions
    from miaotui.stages import run_build_stage

    config = load_config(out / CONFIG)
    paths = {backend: {"narrowed": str(run_build_stage(config, out / "work", BuildOptions(backend=backend)).path)}
             for backend in backends}
    narrow = pooled_rows.narrow_to_pooled_rows
    pooled_rows.narrow_to_pooled_rows = lambda model: pooled_rows.PooledRowsReport(0, 0)  # the pass off
    try:
        for backend in backends:
            built = run_build_stage(config, out / "work-all-rows", BuildOptions(backend=backend))
            paths[backend]["all rows"] = str(built.path)
    finally:
        pooled_rows.narrow_to_pooled_rows = narrow
    return paths


def agreement(out: Path, backends: list[str], threads: int) -> dict:
    """Top-1 agreement of each engine with the checkpoint (transformers, FP32) through Classifier.predict."""

    from miaotui.data.corpus import load_split
    from miaotui.runtime import Classifier

    rows = {}
    for split in ("validation", "test"):
        texts = [e.text for e in load_split(split)]
        reference = None
        for backend in backends:
            for kind, work in zip(KINDS, ("work", "work-all-rows")):
                classifier = Classifier.load(out / work, backend=backend, precision="int8", threads=threads)
                if reference is None:
                    reference = checkpoint_predictions(out / "checkpoint", texts, classifier.tokenizer.truncation["max_length"])
                labels = np.array([p.index for p in classifier.predict(texts)])
                rows.setdefault(backend, {}).setdefault(kind, {})[split] = round(float((labels == reference).mean()), 4)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "hf-minilm",
                        help="where benchmarks/huggingface_finetune.py left the checkpoint and its work dir")
    parser.add_argument("--stack-layers", type=int, help="time a checkpoint of this many layers, the fine-tuned "
                        "one's repeated (its answers are not a trained model's)")
    parser.add_argument("--backends", default="onnxruntime,openvino")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="timing budget per backend, shape and process")
    parser.add_argument("--processes", type=int, default=3, help="fresh processes, one after another")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engines", help=argparse.SUPPRESS)  # the workers' engine paths, as JSON
    args = parser.parse_args()
    args.out = args.out.resolve()
    if args.worker:
        if args.stack_layers:
            args.out = stacked_folder(args.out, args.stack_layers)
        print(json.dumps(one_process(args)))
        return
    if not (args.out / CONFIG).is_file():
        sys.exit(f"{args.out / CONFIG}: not found; run benchmarks/huggingface_finetune.py first")

    from peers import describe_machine, fresh_workers

    from miaotui.config import load_config

    backends = args.backends.split(",")
    started = time.time()
    if args.stack_layers:
        args.out = stack_layers(args.out, args.stack_layers)
    paths = build_both(args.out, backends)
    runs = fresh_workers(__file__, [["--engines", json.dumps(paths)]] * args.processes, "benchmarks/pooled_rows.py")
    speed = {backend: {shape: {"ratio": round(float(np.median([run[backend][shape]["ratio"] for run in runs])), 4),
                               "ratios": [run[backend][shape]["ratio"] for run in runs],
                               **{kind: round(float(np.median([run[backend][shape][kind] for run in runs])), 3)
                                  for kind in KINDS}}
                       for shape in runs[0][backend]} for backend in backends}
    agreed = agreement(args.out, backends, args.threads)
    cpu, machine = describe_machine()
    command = "python benchmarks/pooled_rows.py " + " ".join(sys.argv[1:])
    record = {"command": command.strip(), "machine": machine, "cpu": cpu, "seconds": round(time.time() - started),
              "threads": args.threads, "speed": speed, "agreement_with_checkpoint": agreed, "runs": runs}
    target = REPO / "benchmarks" / "results" / load_config(args.out / CONFIG).name
    target.mkdir(parents=True, exist_ok=True)
    (target / "pooled_rows.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# The last layer on the pooled token only, INT8 engines with and without it\n",
             f"`{record['command']}` ({record['seconds']} s); {machine}; {args.threads} threads; ms per call, "
             f"median over {args.processes} fresh processes of each one's paired median; ratio = all rows / "
             f"narrowed, per process [lowest, highest]\n",
             "| backend | shape | all rows ms | narrowed ms | speedup | per process |", "|---|---|---|---|---|---|"]
    for backend, shapes in speed.items():
        for shape, row in shapes.items():
            lines.append(f"| {backend} | {shape} | {row['all rows']} | {row['narrowed']} | {row['ratio']:.3f}x | "
                         f"{min(row['ratios']):.3f}-{max(row['ratios']):.3f} |")
    lines += ["", "Top-1 agreement with the checkpoint (transformers FP32) through Classifier.predict:", "",
              "| backend | engine | validation | test |", "|---|---|---|---|"]
    for backend, kinds in agreed.items():
        for kind, splits in kinds.items():
            lines.append(f"| {backend} | {kind} | {splits['validation']:.4f} | {splits['test']:.4f} |")
    (target / "pooled_rows.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
