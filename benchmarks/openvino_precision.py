"""OpenVINO's inference precision on miaotui's INT8 IR: f32 (what the openvino engine uses) against bf16.

    python benchmarks/openvino_precision.py [--work build/minilm-sentiment] [--threads 2]

On a CPU with native BF16 (AMX, AVX512-BF16) OpenVINO can run the float parts of an INT8 graph in
bf16. This compiles the work dir's INT8 IR (`miaotui build ... --backend openvino`) both ways and
prints top-1 agreement with PyTorch on the validation split (the work dir's reference.npz, as the
gate reads it) and the mean latency at sequence 128, batch 1 and 32. A measurement for a decision
(issue 22), not yet what the engine does.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("build/minilm-sentiment"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import openvino

    from miaotui.data.datasets import data_set
    from miaotui.models import resolve_config
    from miaotui.workdir import WorkDir

    work = WorkDir(args.work)
    config = resolve_config(work.config)
    ir = next(work.engines_dir.glob("*.openvino.int8.xml"))
    reference = np.load(args.work / "reference.npz")[f"output.{config.model.outputs[0]}"]
    feeds = list(data_set(config, "validation").feeds())
    core = openvino.Core()
    model = core.read_model(str(ir), str(ir.with_suffix(".bin")))
    for hint in ("f32", "bf16"):
        compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint,
                                                     "INFERENCE_NUM_THREADS": args.threads})
        request = compiled.create_infer_request()
        logits = []
        for feed in feeds:
            request.infer(feed)
            logits.append(request.get_output_tensor(0).data.copy())
        agreement = float((np.concatenate(logits).argmax(1) == reference.argmax(1)).mean())
        latency = {}
        for batch in (1, 32):
            feed = {name: np.ones((batch, 128), np.int64) * (100 if name == "input_ids" else 1) for name in config.inputs}
            for _ in range(3):
                request.infer(feed)
            calls = 30 if batch == 1 else 8
            started = time.perf_counter()
            for _ in range(calls):
                request.infer(feed)
            latency[batch] = round((time.perf_counter() - started) / calls * 1000, 2)
        print(f"{hint}: top-1 agreement {agreement:.4f} on {len(reference)}; mean ms batch 1 {latency[1]}, "
              f"batch 32 {latency[32]}")


if __name__ == "__main__":
    main()
