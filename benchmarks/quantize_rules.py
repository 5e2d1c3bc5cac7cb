"""The measurements behind the quantize stage's default rules, rerun on a built-in model.

    python benchmarks/quantize_rules.py [--model minilm-sentiment] [--method minmax]

Each variant is the quantize stage with one decision changed (through the same --include /
--exclude / --smooth-alpha a user has), on the model's real calibration and validation splits:
top-1 agreement with FP32 on the validation split, the accuracy change, the same two on the test split
(twice as many texts: the validation split's 886 tell apart little under 0.3 points), and whether
TensorRT-RTX's parser and builder accept the graph. Needs build/<model>/ from `miaotui optimize <model>`; each
variant works in its own copy. About 2-4 minutes a variant for minilm-sentiment on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

# name -> (what it shows, quantize_options keyword arguments)
VARIANTS = {
    "miaotui default": ("the rules as shipped", {}),
    "every op type": ("ONNX Runtime's default: Q/DQ on every op it supports", {"include": ("*",)}),
    "no smoothing": ("LayerNorm outliers set the per-tensor scales", {"smooth_alpha": 0.0}),
    "attention MatMuls INT8": ("Q x K^T and softmax x V in INT8", {"include": ("rule-activation-matmul",)}),
    "tables INT8": ("embedding tables INT8 per tensor too (every weight op INT8)", {"include": ("rule-table-range",)}),
    "FFN down float": ("post-GELU MatMuls kept float (the rule before shifting)", {"exclude": ("int8-shifted",)}),
    "FFN down INT8 unshifted": ("post-GELU MatMuls INT8, smoothing off", {"include": ("int8-shifted",), "smooth_alpha": 0.0}),
    "no bias correction": ("each INT8 node's mean error left in its output", {"bias_correction": False}),
}


def nodes_with_reason(work: Path, reason: str) -> tuple[str, ...]:
    import json

    report = json.loads((work / "quantization.json").read_text())
    return tuple(d["node"] for d in report["decisions"] if d["reason"] == reason)


def tensorrt_verdict(path: Path, config) -> str:
    try:
        import tensorrt_rtx_bindings as trt
    except ImportError:
        return "TensorRT-RTX not installed"
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        return "parser refused: " + str(parser.get_error(0)).splitlines()[0][:80]
    builder_config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name in config.inputs:
        profile.set_shape(name, *[config.shape_at(name, config.sizes(w)) for w in ("min", "opt", "max")])
    builder_config.add_optimization_profile(profile)
    return "builds" if builder.build_serialized_network(network, builder_config) is not None else "build failed"


def main() -> None:
    from miaotui.errors import MiaotuiError
    from miaotui.stages import quantize_options, run_quantize_stage
    from miaotui.export.quantize_rules import REASONS
    from miaotui.models import resolve_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-sentiment")
    parser.add_argument("--method", default="minmax")
    parser.add_argument("--only", action="append", help="run only these variants (by name)")
    args = parser.parse_args()
    config = resolve_config(args.model)
    source = Path("build") / config.name
    if not (source / "model.opt.onnx").is_file():
        raise SystemExit(f"{source}/model.opt.onnx does not exist: run `miaotui optimize {args.model}` first")

    print(f"{config.name}, {args.method} calibration, agreement on the validation split\n")
    import importlib

    from miaotui.artifacts import sha256_file
    from miaotui.export.quantize import compare_top1

    test_batches = getattr(importlib.import_module(config.model.factory.split(":")[0]), "test_batches")
    reference = source / "model.opt.onnx"
    reference_key = (sha256_file(reference), "test split")
    print("| variant | what | INT8 nodes | top-1 agreement | accuracy | test agreement | test accuracy | TensorRT-RTX |\n"
          "|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name, (what, overrides) in VARIANTS.items():
            if args.only and name not in args.only:
                continue
            work = Path(scratch) / name.replace(" ", "-").replace(",", "")
            shutil.copytree(source, work, ignore=shutil.ignore_patterns("model.int8.onnx*", "quantization.json"))
            overrides = dict(overrides)
            # Rules are named by reason: the default run's report lists the nodes each one decided.
            for flag in ("include", "exclude"):
                for reason in [p for p in overrides.get(flag, ()) if p in REASONS]:
                    default = Path(scratch) / "miaotui-default"
                    nodes = nodes_with_reason(default, reason) if default.is_dir() else ()
                    overrides[flag] = tuple(p for p in overrides[flag] if p != reason) + nodes
            options = quantize_options(config, method=args.method, **overrides)
            try:
                result = run_quantize_stage(config, work, options, progress=False)
            except MiaotuiError as error:
                print(f"| {name} | {what} | | failed: {str(error)[:100]} | | | | |", flush=True)
                continue
            agreement = result.details["agreement"]
            accuracy = f"{agreement['reference_accuracy']:.4f} -> {agreement['candidate_accuracy']:.4f}"
            test = compare_top1(reference, result.path, test_batches(), config.model.outputs[0], progress=False,
                                reference_key=reference_key)
            test_accuracy = f"{test.reference_accuracy:.4f} -> {test.candidate_accuracy:.4f}"
            print(f"| {name} | {what} | {result.details['nodes']['quantized']} | {agreement['top1_agreement']:.4f} "
                  f"| {accuracy} | {test.top1_agreement:.4f} | {test_accuracy} | {tensorrt_verdict(result.path, config)} |",
                  flush=True)


if __name__ == "__main__":
    main()
