"""One benchmark subject timed in this process, which runs nothing else.

    python -m miaotui.bench.worker '{"kind": "engine", "path": "...", "batches": [1, 32], "seqs": [128], "threads": 2}'

Thread counts are fixed before torch, numpy or onnxruntime are imported (torch and ONNX Runtime in
one process fight over threads: a 3x distortion was seen). Prints one JSON line per measurement, so
the parent can show progress while it runs. With "serve": true it loads the subject, says
{"ready": true} and then times one shape per line read from stdin ("BATCH SEQ SECONDS"), answering
with that slice's latencies: the parent alternates subjects in rounds (run.py, interleaved mode).
"""

from __future__ import annotations

import json
import os
import sys
import time


OUTSIDE_RANGE = "outside the engine's shape range"  # a shape's row says this instead of timings


def _fix_threads(threads: int) -> None:
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = str(threads)


def time_calls(call, min_seconds: float, warmup_seconds: float, min_calls: int = 10, max_calls: int = 2000):
    """Latencies (s) of `call()` after a warm-up; at least `min_calls` and `min_seconds` of calls."""
    started = time.perf_counter()
    warm = 0
    while warm < 2 or time.perf_counter() - started < warmup_seconds:
        call()
        warm += 1
    latencies = []
    started = time.perf_counter()
    while (len(latencies) < min_calls or time.perf_counter() - started < min_seconds) and len(latencies) < max_calls:
        before = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - before)
    return latencies


def summarize(latencies: list[float], batch: int) -> dict:
    import numpy as np

    values = np.asarray(latencies) * 1000.0
    return {"p50_ms": float(np.percentile(values, 50)), "p90_ms": float(np.percentile(values, 90)),
            "p99_ms": float(np.percentile(values, 99)), "mean_ms": float(values.mean()), "std_ms": float(values.std()),
            "calls": len(latencies), "samples_per_s": float(batch * len(latencies) / (values.sum() / 1000.0))}


def _shape(dims, batch: int, seq: int):
    return tuple(batch if axis == 0 else (d if isinstance(d, int) else seq) for axis, d in enumerate(dims))


def _feed(specs, batch: int, seq: int, config):
    """Inputs of shape (batch, seq, fixed dims), drawn like the build's checks draw them."""
    from miaotui.engines.shapes import synthetic_feed
    from miaotui.engines.metadata import TensorRange

    ranges = []
    for name, dtype, dims in specs:
        shape = _shape(dims, batch, seq)
        ranges.append(TensorRange(name, dtype, tuple(dims), shape, shape, shape))
    return synthetic_feed(ranges, "opt", config)


def _runner(spec: dict):
    """(call(feed), input specs, the config or None, fits(feed)) for the subject."""
    kind, threads = spec["kind"], spec["threads"]
    config = None  # the model's config: the inputs' value ranges (and the model, for torch)
    if spec.get("config"):
        from miaotui.config import load_config

        config = load_config(spec["config"])
    if kind == "engine":
        from miaotui.runtime import Engine

        engine = Engine.load(spec["path"], threads=threads)
        specs = [(t.name, t.dtype, t.dims) for t in engine.inputs]
        limits = {t.name: t for t in engine.inputs}

        def fits(feed):
            return all(limits[name].accepts(value.shape) for name, value in feed.items())

        return engine.run, specs, config, fits
    if kind == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(spec["path"], options, providers=["CPUExecutionProvider"])
        specs = [(i.name, _onnx_dtype(i.type), tuple(i.shape)) for i in session.get_inputs()]
        return (lambda feed: session.run(None, feed)), specs, config, (lambda feed: True)
    if kind == "openvino":  # an ONNX file or IR as an OpenVINO user runs it: the CPU plugin's defaults, our threads
        import openvino

        core = openvino.Core()
        compiled = core.compile_model(core.read_model(spec["path"]), "CPU", {"INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        specs = [(port.get_any_name(), port.get_element_type().to_dtype().name,
                  tuple(d.get_length() if d.is_static else "dynamic" for d in port.get_partial_shape()))
                 for port in compiled.inputs]
        return (lambda feed: request.infer(feed)), specs, config, (lambda feed: True)
    if kind in ("torch", "torch-dynamic-int8"):
        import torch

        from miaotui.models.loading import load_model

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        model = load_model(config).eval()
        if kind == "torch-dynamic-int8":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear, torch.nn.LSTM}, dtype=torch.qint8)
        specs = [(name, s.dtype, tuple(s.shape)) for name, s in config.inputs.items()]

        def call(feed):
            with torch.inference_mode():
                return model(**{k: torch.from_numpy(v) for k, v in feed.items()})

        def fits(feed):
            sizes = {}
            for name, value in feed.items():
                for axis, dim in enumerate(config.inputs[name].shape):
                    if isinstance(dim, str):
                        sizes[dim] = value.shape[axis]
            return all(config.dims[d].min <= n <= config.dims[d].max for d, n in sizes.items())

        return call, specs, config, fits
    raise ValueError(f"unknown subject kind {kind!r}")


def _onnx_dtype(type_text: str) -> str:
    return {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32",
            "tensor(float16)": "float16", "tensor(bool)": "bool"}.get(type_text, "float32")


def serve(spec: dict, call, specs, config, fits) -> None:
    """Time the shape each stdin line names ("BATCH SEQ SECONDS") and answer with its latencies."""
    print(json.dumps({"ready": True}), flush=True)
    feeds = {}
    for line in sys.stdin:
        words = line.split()
        batch, seq, seconds = int(words[0]), int(words[1]), float(words[2])
        if (batch, seq) not in feeds:
            feeds[batch, seq] = _feed(specs, batch, seq, config)
        feed = feeds[batch, seq]
        if not fits(feed):
            print(json.dumps({"skipped": OUTSIDE_RANGE}), flush=True)
            continue
        # A warm-up each round: the other subjects ran in between and took the caches.
        latencies = time_calls(lambda: call(feed), seconds, spec.get("warmup_seconds", 0.5), min_calls=3)
        print(json.dumps({"latencies": latencies}), flush=True)


def main(argv: list[str] | None = None) -> None:
    spec = json.loads((argv or sys.argv[1:])[0])
    _fix_threads(spec["threads"])
    from miaotui.errors import MiaotuiError

    try:
        call, specs, config, fits = _runner(spec)
    except MiaotuiError as error:  # the parent reports it as one line
        print(json.dumps({"error": str(error)}), flush=True)
        sys.exit(error.exit_code)
    if spec.get("serve"):
        serve(spec, call, specs, config, fits)
        return
    for seq in spec["seqs"]:
        for batch in spec["batches"]:
            feed = _feed(specs, batch, seq, config)
            row = {"name": spec["name"], "kind": spec["kind"], "batch": batch, "seq": seq, "threads": spec["threads"]}
            if not fits(feed):
                print(json.dumps(row | {"skipped": OUTSIDE_RANGE}), flush=True)
                continue
            latencies = time_calls(lambda: call(feed), spec.get("min_seconds", 2.0), spec.get("warmup_seconds", 0.5))
            print(json.dumps(row | summarize(latencies, batch)), flush=True)


if __name__ == "__main__":
    main()
