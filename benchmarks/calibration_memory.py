"""Peak memory of calibrating minilm-sentiment on N samples of a fixed sequence length.

    python benchmarks/calibration_memory.py [--samples 1024] [--seq 128] [--method percentile ...]

Writes the samples (training-split texts, padded or cut to --seq) as an .npz, then calibrates
build/minilm-sentiment/model.opt.onnx (run `miaotui optimize minilm-sentiment` first) once per
method, each in a fresh process, and prints the peak resident memory of that process: the number
the quantize issue bounds (under 4 GB for 1024 x 128). The progress bar is the one users see.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = """
import json, sys
from pathlib import Path
from miaotui.config import load_config
from miaotui.models import BUILTIN_MODELS
from miaotui.data.datasets import data_set, summarize
from miaotui.export.calibration import CalibrationKey, CalibrationRequest, calibrate
from miaotui.export.quantize import name_unnamed_nodes
from miaotui.export.quantize_rules import plan_quantization, tensors_to_calibrate
import onnx

model_path, npz, method = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
config = load_config(BUILTIN_MODELS["minilm-sentiment"])
data = data_set(config, "calibration", npz)
summary = summarize(data)
model = onnx.load(str(model_path), load_external_data=False)
name_unnamed_nodes(model)
tensors = tensors_to_calibrate(model, plan_quantization(model))
del model
request = CalibrationRequest(CalibrationKey("-", summary.fingerprint, summary.samples, method, "-", 0.0, "-"), tensors)
result = calibrate(model_path, data.batches(), request)
import resource
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: this whole process's peak
print(json.dumps({"samples": summary.samples, "seconds": round(result.seconds, 1), "peak_kib": peak}))
"""


def write_samples(path: Path, samples: int, seq: int) -> None:
    from miaotui.data.corpus import load_split
    from miaotui.data.tokenizers import encode, load_tokenizer
    from miaotui.models.minilm_sentiment import HERE

    tokenizer = load_tokenizer(HERE / "tokenizer.json", seq)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=seq)
    texts = [example.text for example in load_split("train")[:samples]]
    encoded = encode(tokenizer, texts)
    np.savez(path, input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])


def main() -> None:
    from miaotui.config import QUANTIZE_METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--method", action="append", choices=QUANTIZE_METHODS)
    parser.add_argument("--model", type=Path, default=Path("build/minilm-sentiment/model.opt.onnx"))
    args = parser.parse_args()
    if not args.model.is_file():
        sys.exit(f"{args.model} does not exist: run `miaotui optimize minilm-sentiment` first")
    with tempfile.TemporaryDirectory() as scratch:
        npz = Path(scratch) / "calibration.npz"
        write_samples(npz, args.samples, args.seq)
        print(f"| method | samples x seq | calibration s | peak RSS |\n|---|---|---|---|")
        for method in args.method or QUANTIZE_METHODS:
            done = subprocess.run([sys.executable, "-c", CHILD, str(args.model), str(npz), method],
                                  stdout=subprocess.PIPE, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {method} | {result['samples']} x {args.seq} | {result['seconds']} | "
                  f"{result['peak_kib'] / 2**20:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
