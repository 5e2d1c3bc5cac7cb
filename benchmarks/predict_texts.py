"""Real texts through `Classifier.predict`: texts per second for calls of 1, 8, 32 and all texts, against
a PyTorch loop over the same texts in the same calls (the same tokenizer, each call padded to its
longest text). Texts are the test split's, shuffled (a service gets short and long texts mixed).
Each subject runs in a process of its own with the thread count set first, and goes through the
texts twice: the first pass pays for every input shape an engine has not seen (OpenVINO prepares
each new (batch, width) shape on its first call, 3-5 ms on MiniLM), the second is a service that has
seen them.

    python benchmarks/predict_texts.py --model lstm-sentiment --work build/lstm-sentiment --texts 320
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _texts(count: int) -> list[str]:
    import random

    from miaotui.data.corpus import load_split

    texts = [example.text for example in load_split("test")]
    random.Random(0).shuffle(texts)
    return texts[:count]


def _calls(texts: list[str], size: int) -> list[list[str]]:
    return [texts[start:start + size] for start in range(0, len(texts), size)]


def run_engine(work: str, texts: list[str], sizes: list[int], threads: int, backend: str | None) -> dict[str, float]:
    from miaotui.runtime import Classifier

    classifier = Classifier.load(work, backend=backend, threads=threads)
    print(f"engine: {classifier.engine.path.name}", file=sys.stderr)
    classifier.predict(texts[:64])  # warm-up
    return _two_passes(classifier.predict, texts, sizes)


def _two_passes(predict, texts: list[str], sizes: list[int]) -> dict[str, dict[str, float]]:
    """Texts per second of each call size, in a first pass over the texts and again."""
    rates: dict[str, dict[str, float]] = {"first": {}, "again": {}}
    for size in sizes:
        for name in rates:
            started = time.perf_counter()
            for call in _calls(texts, size):
                predict(call)
            rates[name][str(size)] = len(texts) / (time.perf_counter() - started)
    return rates


def run_torch(model_name: str, work: str, texts: list[str], sizes: list[int]) -> dict[str, float]:
    import numpy as np
    import torch

    from miaotui.data.tokenizers import encode, load_tokenizer
    from miaotui.models import resolve_config
    from miaotui.models.loading import load_model

    config = resolve_config(model_name)
    model = load_model(config).eval()
    tokenizer = load_tokenizer(config.model.tokenizer, config.dims["seq"].max)
    names = list(config.inputs)

    def predict(call: list[str]) -> np.ndarray:
        encoded = encode(tokenizer, call)
        with torch.inference_mode():
            output = model(*(torch.from_numpy(encoded[name]) for name in names))
        return (output[0] if isinstance(output, tuple) else output).argmax(-1).numpy()

    predict(texts[:64])
    return _two_passes(predict, texts, sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lstm-sentiment")
    parser.add_argument("--work", default=None, help="the work dir with the engine (default: build/<model>)")
    parser.add_argument("--texts", type=int, default=320)
    parser.add_argument("--calls", default="1,8,32,all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default=None, help="which of the work dir's engines (default: Classifier's choice)")
    parser.add_argument("--subject", choices=("engine", "torch"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    work = args.work or f"build/{args.model}"
    texts = _texts(args.texts)
    sizes = [len(texts) if part == "all" else int(part) for part in args.calls.split(",")]
    if args.subject == "engine":
        print(json.dumps(run_engine(work, texts, sizes, args.threads, args.backend)))
        return
    if args.subject == "torch":
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_torch(args.model, work, texts, sizes)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = {}
    for subject in ("torch", "engine"):
        result = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--subject", subject], capture_output=True,
                                text=True, env=env, check=True)
        rows[subject] = json.loads(result.stdout.strip().splitlines()[-1])
    labels = {str(size): ("all" if size == len(texts) else str(size)) for size in sizes}
    engine = args.backend or "Classifier's choice"
    print(f"{args.model} ({engine}), {len(texts)} test-split texts (shuffled), {args.threads} threads: texts/s by call size")
    print("| texts per call | PyTorch | engine, first pass | engine, again | engine again vs PyTorch |")
    print("|---|---|---|---|---|")
    for key, label in labels.items():
        torch_rate = rows["torch"]["again"][key]
        first, again = rows["engine"]["first"][key], rows["engine"]["again"][key]
        print(f"| {label} | {torch_rate:.0f} | {first:.0f} | {again:.0f} | {again / torch_rate:.2f}x |")
    if args.out:
        first = {subject: rates["first"] for subject, rates in rows.items()}
        again = {subject: rates["again"] for subject, rates in rows.items()}
        args.out.write_text(json.dumps({"model": args.model, "texts": len(texts), "threads": args.threads,
                                        "texts_per_s": first, "texts_per_s_again": again}, indent=2) + "\n")


if __name__ == "__main__":
    main()
