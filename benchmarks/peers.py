"""miaotui's INT8 engine against the tools a user would otherwise reach for, on one model, in one run.

    python benchmarks/peers.py [--model minilm-sentiment] [--batch 1,32] [--seq 128] [--threads 2] [--rounds 6]

Peers, each timed in its own process (miaotui.bench) on the same shapes (with --rounds N, all loaded at
once and timed in N alternating rounds: a shared machine's drift then lands on every peer alike), and scored on the same
validation split (the gate's) and test split (neither calibration nor the gate saw it): top-1
agreement with PyTorch FP32, and accuracy on the test split:
- PyTorch FP32 eager: the reference.
- PyTorch dynamic INT8: torch.ao.quantization.quantize_dynamic on Linear (and LSTM) layers.
- ONNX Runtime FP32: model.opt.onnx in a plain session.
- ONNX Runtime quantize_static, default settings: what Optimum's ORTQuantizer or a first try with
  onnxruntime.quantization gives (QDQ, uint8 activations, int8 weights, per-tensor, MinMax), on the
  same 512 calibration samples.
- OpenVINO FP32: model.opt.onnx compiled by OpenVINO with the CPU plugin's defaults (on CPUs with AMX
  or AVX512-BF16 that computes in BF16).
- NNCF INT8: nncf.quantize with its defaults on the same 512 calibration samples, run by OpenVINO
  with its defaults: what an OpenVINO user gets (needs `pip install -e '.[bench]'`); and the same with
  `model_type=TRANSFORMER` (NNCF's scheme for transformers, what Optimum Intel uses for them).
- miaotui INT8: the onnxruntime engine `miaotui run` builds, and the openvino engine
  (`--backend openvino`, float parts in BF16 where the CPU has it) from the same model.int8.onnx.
The floor column: the model's multiply-accumulates at that shape over this machine's measured INT8
GEMM rate (ONNX Runtime MatMulInteger, same threads): no INT8 engine can beat it.
Writes benchmarks/results/<model>/peers.{json,md} and bench.png. Needs nothing but the work dir it builds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def ort_static_default(config, work: Path) -> Path:
    """onnxruntime.quantization.quantize_static with its defaults on the config's calibration data."""
    target = work / "peers" / "model.ort-static-default.onnx"
    if target.is_file():
        return target
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    from miaotui.data.datasets import data_set, without_labels

    batches = data_set(config, "calibration").batches(512)

    class Reader(CalibrationDataReader):
        def get_next(self):
            feed = next(batches, None)
            return None if feed is None else without_labels(feed)

    target.parent.mkdir(exist_ok=True)
    quantize_static(str(work / "model.opt.onnx"), str(target), Reader())
    return target


def nncf_int8(config, work: Path, transformer: bool = False) -> Path:
    """nncf.quantize with its defaults (or model_type TRANSFORMER) on the config's first 512 calibration
    samples, saved as IR."""
    target = work / "peers" / ("model.nncf-int8-transformer.xml" if transformer else "model.nncf-int8.xml")
    if target.is_file():
        return target
    import itertools

    try:
        import nncf
    except ImportError:
        print("error: benchmarks/peers.py: NNCF is not installed; pip install -e '.[bench]' (nncf 3.4.0, the "
              "tables' version)", file=sys.stderr)
        sys.exit(2)
    import openvino

    from miaotui.data.datasets import data_set, sample_rows, without_labels

    rows = [without_labels(row) for row in itertools.islice(sample_rows(data_set(config, "calibration").batches(512)),
                                                            512)]
    quantized = nncf.quantize(openvino.convert_model(str(work / "model.opt.onnx")), nncf.Dataset(rows),
                              subset_size=len(rows), model_type=nncf.ModelType.TRANSFORMER if transformer else None)
    target.parent.mkdir(exist_ok=True)
    openvino.save_model(quantized, str(target))
    return target


def split_scores(config, peers: dict[str, tuple[str, str | None]], splits: dict[str, str]) -> dict[str, dict]:
    """Top-1 agreement with PyTorch FP32 and accuracy of every peer on each split (name -> data source)."""
    import numpy as np
    import onnxruntime
    import torch

    from miaotui.data.datasets import LABELS, data_set, sample_rows, without_labels
    from miaotui.data.tokenizers import tokenizer_padding
    from miaotui.models.loading import load_model
    from miaotui.runtime import Engine
    from miaotui.stages.gate import as_one_text

    fp32 = load_model(config).eval()
    dynamic = torch.ao.quantization.quantize_dynamic(load_model(config).eval(), {torch.nn.Linear, torch.nn.LSTM},
                                                     dtype=torch.qint8)

    def torch_call(model):
        def call(feed):
            with torch.inference_mode():
                return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
        return call

    def session_call(path):
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda feed: session.run(None, feed)[0]

    calls = {"pytorch fp32 eager": torch_call(fp32), "pytorch dynamic int8": torch_call(dynamic)}
    engines: dict[str, Engine] = {}
    pad = tokenizer_padding(config)
    def openvino_call(path):
        import openvino

        core = openvino.Core()
        compiled = core.compile_model(core.read_model(path), "CPU")
        return lambda feed: compiled(feed)[compiled.output(0)]

    for name, (kind, path) in peers.items():
        if kind == "onnx":
            calls[name] = session_call(path)
        elif kind == "openvino":
            calls[name] = openvino_call(path)
        elif kind == "engine":
            engine = engines[name] = Engine.load(path)
            calls[name] = lambda feed, engine=engine: engine.run(feed)[config.model.outputs[0]]
    scores: dict[str, dict] = {name: {} for name in calls}
    for split, source in splits.items():
        tops = {name: [] for name in calls}
        labels, inputs_seen = [], []
        for feed in data_set(config, "validation", override=source).batches():
            inputs = without_labels(feed)
            inputs_seen.append(inputs)
            for name, call in calls.items():
                tops[name].append(np.asarray(call(inputs)).argmax(1))
            labels.append(feed[LABELS])
        labels = np.concatenate(labels)
        reference = np.concatenate(tops["pytorch fp32 eager"])
        for name, t in tops.items():
            scores[name][split] = {"texts": len(labels), "top1_agreement": float(np.mean(np.concatenate(t) == reference)),
                                   "accuracy": float(np.mean(np.concatenate(t) == labels))}
        # miaotui's engines also answer one text a call as Classifier.predict sends it (the openvino engine's
        # batch-1 rows run on its fixed-width models, where the build kept them): score that path too.
        rows = list(sample_rows(inputs_seen))  # the split's texts, read once for every engine
        for name, engine in engines.items():
            one = np.concatenate([engine.run(as_one_text(engine, row, config, pad))[config.model.outputs[0]]
                                  for row in rows]).argmax(1)
            scores[name][split]["one_text_top1_agreement"] = float(np.mean(one == reference))
    return scores


def describe_machine() -> tuple[dict, str]:
    """ONNX Runtime's view of the CPU (cpu_description) and one sentence for a results header."""
    import openvino

    from miaotui.engines.onnxruntime_backend import cpu_description
    from miaotui.engines.openvino_backend import native_bf16

    cpu = cpu_description()
    # cpu['isa'] lists what changes ONNX Runtime's kernels; OpenVINO's float parts also depend on native BF16
    # (AVX512-BF16 or AMX), which the openvino engine and OpenVINO's FP32 default then compute in.
    bf16 = "native BF16 (OpenVINO computes float parts in BF16)" if native_bf16(openvino) else "no native BF16"
    return cpu, f"{cpu['cpu']} ({', '.join(cpu['isa'])}; {bf16})"


def paired_ms(calls: dict, seconds: float, block: int) -> dict[str, np.ndarray]:
    """engines/timing.round_ms over `calls` for about `seconds` (at least 10 cycles), after three warm-up calls
    each (shapes prepared, one-text models compiled); each turn one untimed call, then `block` timed ones.
    One cycle sizes the budget, so a slow shape gets fewer cycles rather than a longer run."""
    from miaotui.engines.timing import round_ms

    for call in calls.values():
        for _ in range(3):
            call()
    cycle_ms = sum(values[0] * (block + 1) for values in round_ms(calls, 1, block, settle=1).values())
    return round_ms(calls, max(10, int(seconds * 1000 / cycle_ms)), block, settle=1)


def fresh_workers(script: str, worker_args: list[list[str]], label: str, progress=None) -> list[dict]:
    """Run `script --worker ...` once per entry of worker_args, one fresh process after another (a process's
    memory and thread placement costs each compiled model differently for as long as it lives), and return
    each one's JSON answer, its stdout's last line; `progress(answer)`, if given, is a line for stderr after
    each. A failed worker ends the benchmark with its stderr."""
    runs = []
    for index, extra in enumerate(worker_args):
        worker = subprocess.run([sys.executable, script, *sys.argv[1:], "--worker", *extra], capture_output=True, text=True)
        if worker.returncode:
            sys.exit(f"error: {label}: worker {index + 1} of {len(worker_args)} failed:\n{worker.stderr[-2000:]}")
        runs.append(json.loads(worker.stdout.strip().splitlines()[-1]))
        if progress:
            print(f"process {index + 1} of {len(worker_args)}: {progress(runs[-1])}", file=sys.stderr, flush=True)
    return runs


def int8_gemm_rate(threads: int) -> float:
    """MAC/s of ONNX Runtime's MatMulInteger (uint8 x int8) on 1024^3, in its own process."""
    code = f"""
import os, time, numpy as np, onnx, onnxruntime
from onnx import helper, TensorProto
n = 1024
graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["c"])], "g",
    [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]), helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
    [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
options = onnxruntime.SessionOptions(); options.intra_op_num_threads = {threads}
session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
feed = {{"a": np.random.randint(0, 255, (n, n)).astype(np.uint8), "b": np.random.randint(-127, 127, (n, n)).astype(np.int8)}}
for _ in range(5): session.run(None, feed)
times = []
for _ in range(30):
    t = time.perf_counter(); session.run(None, feed); times.append(time.perf_counter() - t)
print(n ** 3 / sorted(times)[len(times) // 2])
"""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout)


def model_macs(onnx_path: Path, config, batch: int, seq: int) -> int:
    """Multiply-accumulates of the MatMul/Gemm nodes at one shape (the rest is small next to them)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(onnx_path))
    for value in model.graph.input:
        spec = config.inputs.get(value.name)
        if spec is None:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            size = batch if axis == 0 else (spec.shape[axis] if isinstance(spec.shape[axis], int) else seq)
            dim.Clear()
            dim.dim_value = size
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in
              list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    shapes.update({t.name: list(t.dims) for t in inferred.graph.initializer})
    macs = 0
    for node in inferred.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            if not a or not b or not out or 0 in a + b + out:
                continue
            k = a[-1] if not (node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute)) else a[0]
            count = 1
            for size in out:
                count *= size
            macs += count * k
        elif node.op_type == "LSTM":
            hidden = next(x.i for x in node.attribute if x.name == "hidden_size")
            x = shapes.get(node.input[0])
            if x and 0 not in x:
                macs += x[0] * x[1] * 4 * hidden * (x[2] + hidden)
    return macs


def round_ratio_table(rows: list[dict], engine: str, batches: list[int], seqs: list[int]) -> list[str]:
    """Markdown lines: for each peer and shape, the engine's p50 over the peer's within each round (both timed
    in that round, so the machine's drift cancels): the median, the range, and in how many rounds the engine
    was faster. A lead shows as a median under 1 that most rounds agree with."""
    by_key = {(r["name"], r["batch"], r["seq"]): r for r in rows if "round_p50_ms" in r}
    lines = [f"Per round, {engine} p50 / the peer's p50 (under 1: the engine faster): median [lowest, highest], "
             "rounds the engine was faster.", "",
             "| peer | " + " | ".join(f"b{b} s{s}" for s in seqs for b in batches) + " |",
             "|---|" + "---|" * (len(batches) * len(seqs))]
    for name in dict.fromkeys(r["name"] for r in rows):
        if name == engine:
            continue
        cells = []
        for s in seqs:
            for b in batches:
                ours, theirs = by_key.get((engine, b, s)), by_key.get((name, b, s))
                if not ours or not theirs:
                    cells.append("")
                    continue
                ratios = np.array(ours["round_p50_ms"]) / np.array(theirs["round_p50_ms"])
                cells.append(f"{np.median(ratios):.3f} [{ratios.min():.3f}, {ratios.max():.3f}], "
                             f"{int((ratios < 1).sum())} of {len(ratios)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-sentiment")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--seq", default="128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=1, help="interleave the peers in this many rounds (1: one after another)")
    args = parser.parse_args()

    from miaotui.bench import Subject, run_bench, write_bench_reports
    from miaotui.engines import BuildOptions
    from miaotui.stages import run_build_stage
    from miaotui.models import resolve_config

    config = resolve_config(args.model)
    work = REPO / "build" / config.name
    engine = run_build_stage(config, work, BuildOptions(backend="onnxruntime")).path
    openvino_engine = run_build_stage(config, work, BuildOptions(backend="openvino")).path
    peers = {"onnxruntime fp32": ("onnx", str(work / "model.opt.onnx")),
             "onnxruntime quantize_static default": ("onnx", str(ort_static_default(config, work))),
             "openvino fp32 (defaults)": ("openvino", str(work / "model.opt.onnx")),
             "nncf int8 (openvino, defaults)": ("openvino", str(nncf_int8(config, work))),
             "nncf int8 transformer (openvino)": ("openvino", str(nncf_int8(config, work, transformer=True))),
             "miaotui int8 (onnxruntime)": ("engine", str(engine)),
             "miaotui int8 (openvino)": ("engine", str(openvino_engine))}
    batches = [int(b) for b in args.batch.split(",")]
    seqs = [int(s) for s in args.seq.split(",")]
    subjects = [Subject("pytorch fp32 eager", "torch", None, str(config.path)),
                Subject("pytorch dynamic int8", "torch-dynamic-int8", None, str(config.path))]
    subjects += [Subject(name, kind, path, str(work / "config.toml")) for name, (kind, path) in peers.items()]
    started = time.time()
    rows = run_bench(subjects, batches, seqs, args.threads, min_seconds=args.seconds, rounds=args.rounds)
    module = config.model.factory.split(":")[0]  # the built-in models' test split
    splits = {"validation": config.data.validation, "test": f"{module}:test_batches"}
    scores = split_scores(config, peers, splits)
    rate = int8_gemm_rate(args.threads)
    floors = {(b, s): model_macs(work / "model.opt.onnx", config, b, s) / rate * 1000 for b in batches for s in seqs}
    out = REPO / "benchmarks" / "results" / config.name
    write_bench_reports(rows, out, args.threads)
    reference = {(r["batch"], r["seq"]): r for r in rows if r["name"] == "pytorch fp32 eager"}
    _, machine = describe_machine()
    rounds = f" --rounds {args.rounds}" if args.rounds > 1 else ""
    how = f"interleaved in {args.rounds} rounds" if args.rounds > 1 else "one peer after another"
    lines = [f"{config.name}, {args.threads} threads, `python benchmarks/peers.py --model {config.name} --batch {args.batch} "
             f"--seq {args.seq} --threads {args.threads} --seconds {args.seconds:g}{rounds}` ({time.time() - started:.0f} s, "
             f"{how}). {machine}. INT8 GEMM rate here: {rate / 1e9:.0f} GMAC/s.", "",
             "| peer | top-1 validation | top-1 test | one text a call: validation / test | accuracy (test) | " + " | ".join(
                 f"b{b} s{s} p50 ms (speed-up)" for s in seqs for b in batches) + " |",
             "|---|---|---|---|---|" + "---|" * (len(batches) * len(seqs))]
    for name in dict.fromkeys(r["name"] for r in rows):
        cells = []
        for s in seqs:
            for b in batches:
                row = next(r for r in rows if r["name"] == name and r["batch"] == b and r["seq"] == s)
                speedup = reference[(b, s)]["p50_ms"] / row["p50_ms"]
                cells.append(f"{row['p50_ms']:.1f} ({speedup:.2f}x)")
        score = scores[name]
        one_text = (f"{score['validation']['one_text_top1_agreement']:.4f} / {score['test']['one_text_top1_agreement']:.4f}"
                    if "one_text_top1_agreement" in score["validation"] else "")
        lines.append(f"| {name} | {score['validation']['top1_agreement']:.4f} | {score['test']['top1_agreement']:.4f} | "
                     f"{one_text} | {score['test']['accuracy']:.4f} | " + " | ".join(cells) + " |")
    lines.append("| floor: MACs / INT8 GEMM rate | | | | | " + " | ".join(
        f"{floors[(b, s)]:.1f}" for s in seqs for b in batches) + " |")
    if args.rounds > 1:
        lines += ["", *round_ratio_table(rows, "miaotui int8 (openvino)", batches, seqs)]
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    (out / "peers.json").write_text(json.dumps({"rows": rows, "scores": scores, "int8_gemm_mac_per_s": rate,
                                                "floor_ms": {f"b{b}s{s}": v for (b, s), v in floors.items()}}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
