"""Outlier channel splitting on a built-in model: the rules' INT8 graph with and without it.

    python benchmarks/channel_split.py [--model minilm-sentiment] [--threads 2] [--rounds 6]

Needs build/<model>/model.opt.onnx (`miaotui optimize <model>`). Quantizes twice in scratch copies
(calibration reused from build/<model>/calibration.json when it is there): as shipped, and with the
split off (export/smoothing.py SPLIT_MEDIANS set to infinity). For each: which channels were split
and into how many copies, top-1 agreement with FP32 on the validation split (the quantize stage's),
on the test split the agreement, the flips and the RMS of the error of FP32's top-1-minus-runner-up
logit margin (a flip count moves by whole texts; the margin error is what makes them), all with
ONNX Runtime on the QDQ files; then the onnxruntime engines of both timed interleaved at sequence 128,
batch 1 and 32 (median of `--rounds`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def margins(logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each row's error in FP32's (top-1 - runner-up) logit margin."""
    rows = np.arange(len(reference))
    top = reference.argmax(1)
    others = reference.copy()
    others[rows, top] = -np.inf
    runner = others.argmax(1)
    return (logits[rows, top] - logits[rows, runner]) - (reference[rows, top] - reference[rows, runner])


def scores(logits: np.ndarray, reference: np.ndarray) -> dict:
    """Top-1 flips against `reference` and the RMS of the margin error (`margins`)."""
    error = margins(logits, reference)
    return {"flips": int(np.sum(logits.argmax(1) != reference.argmax(1))),
            "margin_error_rms": round(float(np.sqrt(np.mean(error**2))), 4)}


def model_source(config, model: str) -> Path:
    """build/<model>, which must hold model.opt.onnx: the benchmarks quantize copies of it."""
    source = REPO / "build" / config.name
    if not (source / "model.opt.onnx").is_file():
        raise SystemExit(f"{source}/model.opt.onnx does not exist: run `miaotui optimize {model}` first")
    return source


def split_feeds(tokenizer, split: str, batch: int) -> list[dict]:
    """The split's texts, shortest first, tokenized in batches of `batch`."""
    from miaotui.data.corpus import load_split
    from miaotui.data.tokenizers import encode

    texts = [e.text for e in sorted(load_split(split), key=lambda e: len(e.text))]
    return [encode(tokenizer, texts[start:start + batch]) for start in range(0, len(texts), batch)]


def scratch_copy(source: Path, work: Path, *also_ignored: str) -> None:
    """`source` copied to `work` without what the quantize and build stages make again."""
    shutil.copytree(source, work, ignore=shutil.ignore_patterns(
        "engines", "peers", "bench*", "triton", "reports", "model.int8.onnx*", "quantization.json", "model.fp16*",
        *also_ignored))


def test_logits(path: Path, feeds: list[dict], threads: int) -> np.ndarray:
    from miaotui.export.parity import onnxruntime_session

    session = onnxruntime_session(path, threads)
    return np.concatenate([session.run(None, feed)[0] for feed in feeds])


def timed(engines: dict[str, Path], threads: int, rounds: int) -> dict[str, dict[int, float]]:
    """Median ms per call of each engine at batch 1 and 32, sequence 128, rounds interleaved."""
    from miaotui.export.parity import onnxruntime_session

    sessions = {name: onnxruntime_session(path, threads) for name, path in engines.items()}
    rng = np.random.default_rng(0)
    result: dict[str, dict[int, float]] = {name: {} for name in engines}
    for batch, calls in ((1, 20), (32, 3)):
        feed = {"input_ids": rng.integers(1000, 30000, (batch, 128)).astype(np.int64),
                "attention_mask": np.ones((batch, 128), np.int64)}
        times: dict[str, list[float]] = {name: [] for name in engines}
        for session in sessions.values():
            session.run(None, feed)
        for _ in range(rounds):
            for name, session in sessions.items():
                started = time.perf_counter()
                for _ in range(calls):
                    session.run(None, feed)
                times[name].append((time.perf_counter() - started) / calls * 1000)
        for name in engines:
            result[name][batch] = round(float(np.median(times[name])), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-sentiment")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    import miaotui.export.smoothing as smoothing
    from miaotui.data.tokenizers import load_tokenizer
    from miaotui.engines import BuildOptions
    from miaotui.models import resolve_config
    from miaotui.stages import run_build_stage, run_quantize_stage

    config = resolve_config(args.model)
    source = model_source(config, args.model)
    feeds = split_feeds(load_tokenizer(config.model.tokenizer, 128), "test", 64)
    reference = test_logits(source / "model.opt.onnx", feeds, args.threads)
    rows, engines = {}, {}
    with tempfile.TemporaryDirectory(prefix="miaotui-split-") as scratch:
        for name, medians in (("split (default)", smoothing.SPLIT_MEDIANS), ("no split", float("inf"))):
            work = Path(scratch) / name.split()[0]
            scratch_copy(source, work)
            smoothing.SPLIT_MEDIANS = medians
            details = run_quantize_stage(config, work, force=True, progress=False).details
            engines[name] = run_build_stage(config, work, BuildOptions(backend="onnxruntime")).path
            test = scores(test_logits(work / "model.int8.onnx", feeds, args.threads), reference)
            report = json.loads((work / "quantization.json").read_text())
            rows[name] = {
                "split": {s["tensor"]: dict(zip(s["split"], s["copies"])) for s in report["smoothed_inputs"] if s["split"]},
                "validation_agreement": round(details["agreement"]["top1_agreement"], 4),
                "test_agreement": round(1 - test["flips"] / len(reference), 4),
                "test_flips": test["flips"],
                "test_margin_error_rms": test["margin_error_rms"],
            }
            print(name, json.dumps(rows[name]), flush=True)
        speed = timed(engines, args.threads, args.rounds)
    print(f"\n{config.name}, {len(reference)} test texts, {args.threads} threads: "
          f"`python benchmarks/channel_split.py --model {args.model} --rounds {args.rounds}`\n")
    print("| graph | split channels (copies) | validation agreement | test agreement (flips) | test margin error RMS "
          "| onnxruntime b1 ms | b32 ms |\n|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        split = "; ".join(f"{tensor}: " + ", ".join(f"{c} ({n})" for c, n in channels.items())
                          for tensor, channels in row["split"].items()) or "-"
        print(f"| {name} | {split} | {row['validation_agreement']:.4f} | {row['test_agreement']:.4f} "
              f"({row['test_flips']}) | {row['test_margin_error_rms']:.4f} | {speed[name][1]} | {speed[name][32]} |")


if __name__ == "__main__":
    main()
