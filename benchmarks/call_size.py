"""What one call's size costs an engine: milliseconds per 1,000 tokens for calls of 512 to 8,192
tokens at sequence lengths 64, 128 and 256, each shape run as one call (Engine.run with batch_size
set to the whole batch, so no call split applies). Flat rows mean the size of a call does not
matter; a rise past some size is what engines/call_split.py measures at build.

    python benchmarks/call_size.py build/minilm-sentiment/engines/minilm-sentiment.onnxruntime.int8.ort --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses

SHAPES = {64: (8, 16, 32, 64), 128: (4, 8, 16, 24, 32, 64), 256: (2, 4, 8, 16)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per shape (best kept)")
    args = parser.parse_args()

    from miaotui.bench.worker import time_calls
    from miaotui.engines.shapes import synthetic_feed
    from miaotui.runtime import Engine

    engine = Engine.load(args.engine, threads=args.threads)
    print(f"{args.engine}, {args.threads or 'all'} threads: ms per 1k tokens, one call per shape (best of {args.repeats})\n")
    print("| tokens a call | " + " | ".join(f"seq {seq}" for seq in SHAPES) + " |")
    print("|---|" + "---|" * len(SHAPES))
    cells: dict[int, dict[int, str]] = {}
    for seq, batches in SHAPES.items():
        for batch in batches:
            ranges = [dataclasses.replace(r, opt=(batch, *(seq,) * (len(r.opt) - 1))) for r in engine.inputs]
            if any(not r.accepts(r.opt) for r in ranges):
                continue
            feed = synthetic_feed(ranges, "opt", None)
            best = min(time_calls(lambda: engine.run(feed, batch_size=batch), min_seconds=0, warmup_seconds=0,
                                  min_calls=args.repeats, max_calls=args.repeats))
            cells.setdefault(batch * seq, {})[seq] = f"{best * 1000 / (batch * seq) * 1000:.1f} (b{batch})"
    for tokens in sorted(cells):
        print(f"| {tokens:,} | " + " | ".join(cells[tokens].get(seq, "") for seq in SHAPES) + " |")


if __name__ == "__main__":
    main()
