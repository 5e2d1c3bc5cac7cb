"""The accuracy-budgeted search on minilm-sentiment, against the all-INT8 graph and the default rules.

    python benchmarks/search_minilm.py [--target 0.995] [--threads 2] [--seconds 10]

Builds three INT8 onnxruntime engines of minilm-sentiment, each in its own work dir under build/:
- search: `[quantize] target_top1_agreement = TARGET` (the search's time is reported),
- all-int8: every weight op INT8 (the rules with the embedding tables included: `--include Gather`),
- rules: the built-in default (build/minilm-sentiment, as `make export MODEL=minilm-sentiment` leaves it).
Then: top-1 agreement with FP32 on the validation split (the quantize stage's), top-1 agreement with
FP32 and accuracy on the test split (engine vs model.opt.onnx in ONNX Runtime, which equals PyTorch
within 1e-4), and throughput with `miaotui bench` (PyTorch FP32
eager as the baseline, batch 32 and 1, sequence 128). "Gain kept" is (search - FP32) / (all-int8 - FP32)
in samples per second. Writes benchmarks/results/minilm-sentiment/search.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(config, work: Path) -> tuple[Path, dict, float]:
    from miaotui.engines import BuildOptions
    from miaotui.stages import Build, Pipeline

    started = time.perf_counter()
    pipeline = Pipeline(config, work)
    built = pipeline.run(Build(BuildOptions(backend="onnxruntime")))
    quantize = pipeline.result("quantize")
    return built.path, quantize.details, time.perf_counter() - started


def test_scores(config, engine: Path, reference: Path) -> tuple[float, float, float]:
    """(FP32 accuracy, engine accuracy, engine top-1 agreement with FP32) on the test split."""
    import numpy as np

    from miaotui.data.corpus import load_split
    from miaotui.data.tokenizers import encode, load_tokenizer
    from miaotui.export.parity import onnxruntime_session
    from miaotui.models.minilm_sentiment import MAX_LENGTH
    from miaotui.runtime import Engine

    tokenizer = load_tokenizer(config.model.tokenizer, MAX_LENGTH)
    examples = sorted(load_split("test"), key=lambda e: len(e.text))
    served, fp32 = Engine.load(engine), onnxruntime_session(reference)
    right = np.zeros(3)
    for start in range(0, len(examples), 32):
        chunk = examples[start : start + 32]
        feed = encode(tokenizer, [e.text for e in chunk])
        labels = np.array([e.label for e in chunk])
        expected, answered = fp32.run(None, feed)[0].argmax(1), served(**feed)["logits"].argmax(1)
        right += [(expected == labels).sum(), (answered == labels).sum(), (answered == expected).sum()]
    return tuple(float(r / len(examples)) for r in right)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", type=float, default=0.995)
    parser.add_argument("--threads", type=int, default=2)
    # Per shape: the search and rules graphs often differ by a few percent only, under a short run's noise
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    from miaotui.models import resolve_config

    base = resolve_config("minilm-sentiment")

    def with_target(target):
        return dataclasses.replace(base, quantize=dataclasses.replace(base.quantize, target_top1_agreement=target))

    runs = {
        "search": (with_target(args.target), REPO / "build" / "minilm-search"),
        "all-int8": (dataclasses.replace(base, quantize=dataclasses.replace(base.quantize, include=("Gather",))),
                     REPO / "build" / "minilm-all-int8"),
        "rules": (base, REPO / "build" / "minilm-sentiment"),
    }
    results = {}
    for name, (config, work) in runs.items():
        engine, quantize, seconds = build(config, work)
        fp32_accuracy, accuracy, test_agreement = test_scores(config, engine, work / "model.opt.onnx")
        search = quantize.get("search") or {}
        results[name] = {"engine": str(engine), "quantize_seconds": round(seconds, 1),
                         "search_seconds": search.get("seconds"), "kept_float": len(search.get("kept_float", [])),
                         "int8_nodes": quantize["ops"]["quantized"],
                         "validation_agreement": quantize["agreement"]["top1_agreement"],
                         "held_out_agreement": search.get("agreement"), "test_agreement": test_agreement,
                         "test_accuracy_fp32": fp32_accuracy, "test_accuracy": accuracy,
                         "test_accuracy_drop_points": round(100 * (fp32_accuracy - accuracy), 3)}
        print(name, json.dumps(results[name]), flush=True)

    folder = REPO / "benchmarks" / "results" / "minilm-sentiment" / "search"
    command = [sys.executable, "-m", "miaotui.cli", "bench", *(results[n]["engine"] for n in runs),
               "--torch", "minilm-sentiment", "--batch", "1,32", "--seq", "128", "--threads", str(args.threads),
               "--seconds", str(args.seconds), "--report", str(folder)]
    subprocess.run(command, check=True, cwd=REPO)
    rows = json.loads((folder / "bench.json").read_text())["rows"]

    def throughput(engine_name: str | None, batch: int) -> float:
        return next(r["samples_per_s"] for r in rows if r["batch"] == batch and (
            r["name"] == "pytorch fp32 eager" if engine_name is None
            else f"({Path(engine_name).parent.parent.name}/{Path(engine_name).name})" in r["name"]))

    for batch in (1, 32):
        fp32 = throughput(None, batch)
        gain = {n: throughput(results[n]["engine"], batch) - fp32 for n in runs}
        for name in runs:
            results[name][f"b{batch}_samples_per_s"] = round(throughput(results[name]["engine"], batch), 2)
        results["search"][f"b{batch}_gain_kept"] = round(gain["search"] / gain["all-int8"], 3)
        results[f"pytorch_fp32_b{batch}_samples_per_s"] = round(fp32, 2)
    (folder.parent / "search.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| graph | INT8 nodes | kept in float | validation agreement | test agreement | test accuracy (FP32 -> INT8) | "
             "b1 samples/s | b32 samples/s | search s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in runs:
        r = results[name]
        lines.append(f"| {name} | {r['int8_nodes']} | {r['kept_float'] if name == 'search' else '-'} | "
                     f"{r['validation_agreement']:.4f} | {r['test_agreement']:.4f} | "
                     f"{r['test_accuracy_fp32']:.4f} -> {r['test_accuracy']:.4f} | "
                     f"{r['b1_samples_per_s']} | {r['b32_samples_per_s']} | {r['search_seconds'] or '-'} |")
    lines.append(f"\nPyTorch FP32 eager: {results['pytorch_fp32_b1_samples_per_s']} / "
                 f"{results['pytorch_fp32_b32_samples_per_s']} samples/s (b1 / b32). Gain of the all-INT8 graph kept by "
                 f"the search: {results['search']['b1_gain_kept']:.0%} at b1, {results['search']['b32_gain_kept']:.0%} "
                 f"at b32 ({args.threads} threads, sequence 128, one run: `python benchmarks/search_minilm.py --target {args.target} "
                 f"--seconds {args.seconds:g}`).")
    (folder.parent / "search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
