"""Two engines in one process, called in turn (a service with two classifiers): how much slower each
answers than when it is called alone, with ONNX Runtime's threads spinning on after each call (its
default) and with miaotui's rule (engines/onnxruntime_backend.py STOP_SPINNING_WHEN_SHARED: once a
process holds two onnxruntime engines, their threads stop spinning when a call returns). And why the
rule waits for a second engine: one engine alone, called `--gap-ms` after its last call returned, with
its threads spinning on and with them stopped.

Each co-host process loads the first work dir's engine through `Classifier.load`, then the second,
and times rounds of: the first alone over the texts, the second alone, then both in turn (first,
second, first, ...), each call `--call` texts. The ratio in turn / alone is taken within each round,
so a machine that drifts between rounds moves both sides alike. Processes alternate between the
settings; the lone-engine processes likewise.

    python benchmarks/cohost.py --works build/minilm-sentiment,build/lstm-sentiment --processes 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict_texts import _calls, _texts  # noqa: E402  (a sibling script: the same shuffled test texts)

SETTINGS = ("spin", "stop")
LONE = ("lone-spin", "lone-stop")


def _timed(classifier, batch: list[str]) -> float:
    started = time.perf_counter()
    classifier.predict(batch)
    return time.perf_counter() - started


def _subject(setting: str, works: list[str], backends: list[str | None], texts: list[str], call: int, threads: int,
             rounds: int) -> dict:
    from miaotui.engines import onnxruntime_backend
    from miaotui.runtime import Classifier

    onnxruntime_backend.STOP_SPINNING_WHEN_SHARED = setting == "stop"
    calls = _calls(texts, call)

    def loaded(work: str, backend: str | None):
        classifier = Classifier.load(work, backend=backend, threads=threads)
        classifier.predict(texts)  # every shape seen once: OpenVINO prepares each new one on its first call
        return classifier

    classifiers = [loaded(work, backend) for work, backend in zip(works, backends)]
    ratios: list[list[float]] = [[] for _ in classifiers]
    alone_ms: list[list[float]] = [[] for _ in classifiers]
    for _ in range(rounds):
        alone = [statistics.median(_timed(classifier, batch) for batch in calls) for classifier in classifiers]
        in_turn: list[list[float]] = [[] for _ in classifiers]
        for batch in calls:
            for index, classifier in enumerate(classifiers):
                in_turn[index].append(_timed(classifier, batch))
        for index in range(len(classifiers)):
            ratios[index].append(statistics.median(in_turn[index]) / alone[index])
            alone_ms[index].append(alone[index] * 1e3)
    return {"engines": [c.engine.path.name for c in classifiers], "ratio": ratios, "alone_ms": alone_ms}


def _lone(setting: str, work: str, backend: str | None, texts: list[str], call: int, threads: int, rounds: int,
          gap_s: float) -> dict:
    from miaotui.runtime import Classifier

    classifier = Classifier.load(work, backend=backend, threads=threads)
    if classifier.engine.backend != "onnxruntime":
        return {"engine": classifier.engine.path.name, "ms": []}  # the setting is ONNX Runtime's
    classifier.predict(texts)
    if setting == "lone-stop":
        classifier.engine._backend._stop_spinning()  # what the rule does once a second engine is loaded
    medians = []
    for _ in range(rounds):
        times = []
        for batch in _calls(texts, call):
            time.sleep(gap_s)
            times.append(_timed(classifier, batch))
        medians.append(statistics.median(times) * 1e3)
    return {"engine": classifier.engine.path.name, "ms": medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--works", default="build/minilm-sentiment,build/lstm-sentiment",
                        help="two work dirs, comma-separated")
    parser.add_argument("--backends", default="onnxruntime,onnxruntime",
                        help="each work dir's engine, comma-separated ('auto': Classifier's choice)")
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--call", type=int, default=1, help="texts per call")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--processes", type=int, default=4, help="per setting, alternating")
    parser.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="lone engine: the pause before each call")
    parser.add_argument("--which", default="0", help=argparse.SUPPRESS)
    parser.add_argument("--subject", choices=SETTINGS + LONE, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    works = args.works.split(",")
    backends = [None if b == "auto" else b for b in args.backends.split(",")]
    if len(works) != 2 or len(backends) != 2:
        sys.exit("error: --works and --backends: expected two comma-separated entries each")
    texts = _texts(args.texts)
    if args.subject in LONE:
        which = int(args.which)
        print(json.dumps(_lone(args.subject, works[which], backends[which], texts, args.call, args.threads, args.rounds,
                               args.gap_ms / 1e3)))
        return
    if args.subject:
        print(json.dumps(_subject(args.subject, works, backends, texts, args.call, args.threads, args.rounds)))
        return

    from miaotui.engines.choice import this_machine

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    runs: dict[str, list[dict]] = {setting: [] for setting in SETTINGS + LONE}
    for process in range(args.processes):
        for pair in (SETTINGS, LONE):
            for setting in (pair if process % 2 == 0 else pair[::-1]):
                for which in ([None] if pair == SETTINGS else ["0", "1"]):
                    extra = ["--which", which] if which else []
                    result = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--subject", setting, *extra],
                                            capture_output=True, text=True, env=env)
                    if result.returncode:
                        sys.exit(f"error: benchmarks/cohost.py: the {setting} process failed:\n{result.stderr[-2000:]}")
                    runs[setting].append(json.loads(result.stdout.strip().splitlines()[-1]))
    engines = runs["spin"][0]["engines"]
    summary = {"machine": this_machine(), "threads": args.threads, "texts": len(texts), "call": args.call,
               "rounds": args.rounds, "processes": args.processes, "engines": engines, "settings": {}}
    print(f"{this_machine()}\n{len(texts)} test-split texts, {args.call} per call, {args.threads} threads, "
          f"{args.processes} processes x {args.rounds} rounds per setting; medians")
    print("| ONNX Runtime threads after a call | engine | alone, ms a call | called in turn / alone |")
    print("|---|---|---|---|")
    for setting in SETTINGS:
        rows = []
        for index, engine in enumerate(engines):
            ratio = statistics.median(r for run in runs[setting] for r in run["ratio"][index])
            alone = statistics.median(ms for run in runs[setting] for ms in run["alone_ms"][index])
            rows.append({"engine": engine, "alone_ms": round(alone, 3), "in_turn_vs_alone": round(ratio, 3)})
            label = "spin on (ORT default)" if setting == "spin" else "stop once two are loaded (miaotui)"
            print(f"| {label} | {engine} | {alone:.3f} | {ratio:.2f}x |")
        summary["settings"][setting] = rows
    summary["lone"] = {"gap_ms": args.gap_ms, "engines": []}
    print(f"\nEach engine alone in its process, each call {args.gap_ms:g} ms after the last returned, ms a call:")
    for engine in engines:
        if not any(run["ms"] for run in runs["lone-spin"] if run["engine"] == engine):
            continue
        lone = {setting: statistics.median(ms for run in runs[setting] if run["engine"] == engine for ms in run["ms"])
                for setting in LONE}
        summary["lone"]["engines"].append({"engine": engine, **{s: round(ms, 3) for s, ms in lone.items()}})
        print(f"{engine}: threads spinning on {lone['lone-spin']:.3f}, stopped {lone['lone-stop']:.3f} "
              f"({lone['lone-stop'] / lone['lone-spin']:.2f}x)")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
