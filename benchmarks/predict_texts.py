"""Real texts through `Classifier.predict`: texts per second for calls of 1, 8, 32 and all texts, against
a PyTorch loop over the same texts in the same calls (the same tokenizer, each call padded to its
longest text). Texts are the test split's, shuffled (a service gets short and long texts mixed).
Each subject runs in a process of its own with the thread count set first, and goes through the
texts twice: the first pass pays for every input shape an engine has not seen (OpenVINO prepares
each new (batch, width) shape on its first call, 3-5 ms on MiniLM), the second is a service that has
seen them.

    python benchmarks/predict_texts.py --model lstm-sentiment --work build/lstm-sentiment --texts 320

With --peers, the same texts through the same tokenization and batches (Classifier.predict's, each
batch padded to its longest text) for both miaotui CPU engines and the peers of benchmarks/peers.py
that take dynamic shapes (ONNX Runtime FP32, OpenVINO FP32, NNCF INT8 default and transformer, each
run as benchmarks/peers.py runs it): what each would give a service on real texts, where the seq-128
table measures the kernels. Each engine and peer is loaded in a process of its own and makes its first
pass alone; then the warm passes are interleaved, --repeat rounds (every subject once per call size,
the order reversed every other round), and the table shows their medians.

    python benchmarks/predict_texts.py --model minilm-sentiment --peers --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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


def engine_predict(work: str, texts: list[str], threads: int, backend: str | None):
    from miaotui.runtime import Classifier

    classifier = Classifier.load(work, backend=backend, threads=threads)
    print(f"engine: {classifier.engine.path.name}", file=sys.stderr)
    classifier.predict(texts[:64])  # warm-up
    return classifier.predict


class _PeerEngine:
    """A miaotui engine's input description around a peer's call: Classifier.predict then feeds the peer
    exactly the batches it feeds the engine, and reads the peer's first output."""

    def __init__(self, engine, call, output: str):
        self._engine, self._call, self._output = engine, call, output

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def run(self, feed):
        return {self._output: self._call(feed)[0]}


def peer_predict(work: str, texts: list[str], threads: int, kind: str, path: str):
    from miaotui.bench.worker import _runner
    from miaotui.runtime import Classifier

    classifier = Classifier.load(work, backend="onnxruntime", threads=threads)  # tokenizer, labels, inputs
    call, *_ = _runner({"kind": kind, "path": path, "threads": threads})
    classifier.engine = _PeerEngine(classifier.engine, call, classifier.output)
    classifier.predict(texts[:64])  # warm-up, as for the engines
    return classifier.predict


def _pass(predict, texts: list[str], size: int) -> float:
    """Texts per second over all texts in calls of `size`."""
    started = time.perf_counter()
    for call in _calls(texts, size):
        predict(call)
    return len(texts) / (time.perf_counter() - started)


def serve_passes(predict, texts: list[str], sizes: list[int]) -> None:
    """The peers mode's worker: the first pass at every call size, then one pass per call size read from stdin."""
    print(json.dumps({str(size): _pass(predict, texts, size) for size in sizes}), flush=True)
    for line in sys.stdin:
        print(json.dumps(_pass(predict, texts, int(line))), flush=True)


def _two_passes(predict, texts: list[str], sizes: list[int]) -> dict[str, dict[str, float]]:
    """Texts per second of each call size, in a first pass over the texts and again."""
    rates: dict[str, dict[str, float]] = {"first": {}, "again": {}}
    for size in sizes:
        for name in rates:
            rates[name][str(size)] = _pass(predict, texts, size)
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
    parser.add_argument("--peers", action="store_true", help="both miaotui CPU engines and the peers, same texts and batches")
    parser.add_argument("--repeat", type=int, default=3, help="with --peers: interleaved rounds of warm passes (median shown)")
    parser.add_argument("--subject", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    work = args.work or f"build/{args.model}"
    texts = _texts(args.texts)
    sizes = [len(texts) if part == "all" else int(part) for part in args.calls.split(",")]
    if args.subject == "engine":
        print(json.dumps(_two_passes(engine_predict(work, texts, args.threads, args.backend), texts, sizes)))
        return
    if args.subject and args.subject.startswith("peer:"):
        _, kind, path = args.subject.split(":", 2)
        serve_passes(peer_predict(work, texts, args.threads, kind, path), texts, sizes)
        return
    if args.subject and args.subject.startswith("backend:"):
        serve_passes(engine_predict(work, texts, args.threads, args.subject.split(":", 1)[1]), texts, sizes)
        return
    if args.subject == "torch":
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(run_torch(args.model, work, texts, sizes)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.peers:
        peers_table(args, work, texts, sizes, env)
        return
    rows = {}
    for subject in ("torch", "engine"):
        rows[subject] = _subject_rates(sys.argv[1:], subject, env)
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


def _subject_rates(argv: list[str], subject: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, __file__, *argv, "--subject", subject], capture_output=True, text=True,
                            env=env)
    if result.returncode:
        sys.exit(f"error: benchmarks/predict_texts.py: subject {subject} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _reply(worker: subprocess.Popen, subject: str):
    line = worker.stdout.readline()
    if not line:
        worker.wait()
        worker.stderr.seek(0)
        sys.exit(f"error: benchmarks/predict_texts.py: subject {subject} stopped:\n{worker.stderr.read()[-2000:]}")
    return json.loads(line)


def peers_table(args, work: str, texts: list[str], sizes: list[int], env: dict) -> None:
    """Every miaotui CPU engine and dynamic-shape peer over the same texts and batches. Each is loaded in
    its own process and makes its first pass there; then the passes at each call size are interleaved,
    --repeat rounds, the order reversed every other round (a shared machine's drift lands on all alike)."""
    import statistics

    from peers import nncf_int8  # this folder's peer recipes: the same IRs as the seq-128 table

    from miaotui.engines.onnxruntime_backend import cpu_description
    from miaotui.models import resolve_config

    config = resolve_config(args.model)
    root = Path(work)
    subjects = {"miaotui int8 (onnxruntime)": "backend:onnxruntime", "miaotui int8 (openvino)": "backend:openvino",
                "onnxruntime fp32": f"peer:onnx:{root / 'model.opt.onnx'}",
                "openvino fp32 (defaults)": f"peer:openvino:{root / 'model.opt.onnx'}",
                "nncf int8 (openvino, defaults)": f"peer:openvino:{nncf_int8(config, root)}",
                "nncf int8 transformer (openvino)": f"peer:openvino:{nncf_int8(config, root, transformer=True)}"}
    argv = [arg for arg in sys.argv[1:] if arg != "--peers"]
    started = time.time()
    first: dict[str, dict] = {}
    again: dict[str, dict[str, list[float]]] = {name: {str(size): [] for size in sizes} for name in subjects}
    workers = {}
    try:
        for name, subject in subjects.items():  # one at a time: each first pass runs alone
            # stderr to a file: a pipe nobody reads would block a chatty worker
            workers[name] = subprocess.Popen([sys.executable, __file__, *argv, "--subject", subject], text=True,
                                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=tempfile.TemporaryFile("w+"))
            first[name] = _reply(workers[name], name)
        for repeat in range(args.repeat):
            order = list(subjects) if repeat % 2 == 0 else list(subjects)[::-1]
            for size in sizes:
                for name in order:
                    time.sleep(0.3)  # let the last subject's threads go idle
                    workers[name].stdin.write(f"{size}\n")
                    workers[name].stdin.flush()
                    again[name][str(size)].append(_reply(workers[name], name))
    finally:
        for worker in workers.values():
            worker.kill()
    torch_rates = _subject_rates(argv, "torch", env)
    keys = [str(size) for size in sizes]
    labels = {key: ("all" if int(key) == len(texts) else key) for key in keys}

    def median(name: str, key: str) -> float:
        return statistics.median(again[name][key])

    cpu = cpu_description()
    calls = "" if args.calls == "1,8,32,all" else f" --calls {args.calls}"
    lines = [f"{args.model}, {len(texts)} test-split texts (shuffled), {args.threads} threads, texts/s by texts per call, "
             f"warm: median of {args.repeat} interleaved rounds (first pass): `python benchmarks/predict_texts.py --model {args.model} "
             f"--texts {len(texts)}{calls} --peers --repeat {args.repeat}` ({time.time() - started:.0f} s). {cpu['cpu']} "
             f"({', '.join(cpu['isa'])}).", "",
             "| subject | " + " | ".join(labels[key] for key in keys) + " |", "|---|" + "---|" * len(keys),
             "| pytorch fp32 (a loop over the same calls) | " + " | ".join(
                 f"{torch_rates['again'][key]:.0f} ({torch_rates['first'][key]:.0f})" for key in keys) + " |"]
    for name in subjects:
        lines.append(f"| {name} | " + " | ".join(
            f"{median(name, key):.0f} ({first[name][key]:.0f})" for key in keys) + " |")
    print("\n".join(lines))
    out = args.out or Path("benchmarks/results") / args.model / "predict_texts.peers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "texts": len(texts), "threads": args.threads, "cpu": cpu,
                               "torch": torch_rates, "first": first, "again": again}, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
