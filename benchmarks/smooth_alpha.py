"""SmoothQuant's strength (`--smooth-alpha`) on a built-in model: the rules' INT8 graph at each alpha.

    python benchmarks/smooth_alpha.py [--model minilm-sentiment] [--alphas 0.5,0.65,0.8,0.85,0.9,0.95] [--openvino]

Needs build/<model>/model.opt.onnx (`miaotui optimize <model>`). Quantizes once per alpha in a scratch
copy (the alpha is part of the calibration key: each recalibrates). For each: top-1 flips against
FP32 and the RMS of the error of FP32's top-1-minus-runner-up logit margin on the validation and test
splits, with ONNX Runtime on the QDQ file; with `--openvino`, also the openvino engine built from it
(float parts in BF16 where the CPU has it). Flips near 0.5% of a split are a few near-tie texts and
move by chance between runtimes and alphas; the margin error is what makes them, and it is what
decides between alphas. Shifted (GELU) inputs keep their own alpha (export/smoothing.py SHIFTED_ALPHA).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from channel_split import model_source, scores, scratch_copy, split_feeds, test_logits  # noqa: E402  (a sibling script)

SPLITS = ("validation", "test")


def engine_logits(path: Path, feeds: list[dict], threads: int, output: str) -> np.ndarray:
    from miaotui.runtime import Engine

    engine = Engine.load(path, threads=threads)
    return np.concatenate([engine(**feed)[output] for feed in feeds])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-sentiment")
    parser.add_argument("--alphas", default="0.5,0.65,0.8,0.85,0.9,0.95")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--openvino", action="store_true", help="also build and score the openvino engine")
    args = parser.parse_args()

    from miaotui.data.tokenizers import load_tokenizer
    from miaotui.engines import BuildOptions
    from miaotui.models import resolve_config
    from miaotui.stages import run_build_stage, run_quantize_stage

    base = resolve_config(args.model)
    source = model_source(base, args.model)
    tokenizer = load_tokenizer(base.model.tokenizer, 128)
    feeds = {split: split_feeds(tokenizer, split, 32) for split in SPLITS}
    reference = {split: test_logits(source / "model.opt.onnx", feeds[split], args.threads) for split in SPLITS}
    runtimes = ("onnxruntime", "openvino") if args.openvino else ("onnxruntime",)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="miaotui-alpha-") as scratch:
        for alpha in (float(a) for a in args.alphas.split(",")):
            config = dataclasses.replace(base, quantize=dataclasses.replace(base.quantize, smooth_alpha=alpha))
            work = Path(scratch) / f"alpha-{alpha}"
            scratch_copy(source, work, "calibration.json")
            run_quantize_stage(config, work, force=True, progress=False)
            row = {}
            for split in SPLITS:
                row[f"onnxruntime {split}"] = scores(test_logits(work / "model.int8.onnx", feeds[split], args.threads),
                                                     reference[split])
            if args.openvino:
                engine = run_build_stage(config, work, BuildOptions(backend="openvino")).path
                for split in SPLITS:
                    row[f"openvino {split}"] = scores(engine_logits(engine, feeds[split], args.threads, base.model.outputs[0]),
                                                      reference[split])
            rows[alpha] = row
            print(alpha, json.dumps(row), flush=True)
    print(f"\n{base.name}, {len(reference['validation'])} validation and {len(reference['test'])} test texts, QDQ graph in ONNX Runtime"
          f"{' and the openvino engine' if args.openvino else ''}: `python benchmarks/smooth_alpha.py --model "
          f"{args.model} --alphas {args.alphas}{' --openvino' if args.openvino else ''}`\n")
    columns = [f"{runtime} {split}" for runtime in runtimes for split in SPLITS]
    print("| alpha | " + " | ".join(f"{c} flips / margin error RMS" for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for alpha, row in rows.items():
        print(f"| {alpha:g} | " + " | ".join(f"{row[c]['flips']} / {row[c]['margin_error_rms']:.4f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
