"""ONNX -> engine + sidecar, for any backend: the one entry point the CLI and the build stage share.

Everything that can be checked before a builder runs is checked first (the file is ONNX, its
precision is the one asked for, the shape ranges fit the model, the output folder exists), the engine
and its sidecar are written under temporary names and renamed only when the build and its checks
succeeded: a failure never leaves a partial engine. The backend itself (engines/backend.py) only
compiles and checks what it compiled.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from miaotui.artifacts import atomic_path, atomic_write_json, sha256_file
from miaotui.config import PRECISIONS, Config
from miaotui.engines.backend import BuildJob, get_backend
from miaotui.engines.metadata import EngineMetadata, TensorInfo
from miaotui.engines.tensorrt_engine import TensorRTOptions
from miaotui.engines.timing import BUSY_ELSEWHERE_WARNING, timing_ledger
from miaotui.errors import InputError
from miaotui.workdir import WorkDir, engine_file_name, sidecar_path


@dataclass(frozen=True)
class BuildOptions:
    backend: str = "onnxruntime"
    precision: str | None = None  # None: whatever the graph holds; else it must hold this
    shapes: tuple[str, ...] = ()  # NAME:MIN,OPT,MAX overrides of the config's [dims]
    provider: str = "cpu"  # onnxruntime: the execution provider to optimize for
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)
    # onnxruntime on the CPU, INT8 graphs: "uint8" moves activations to zero point 128 (the same grid as
    # the graph's int8 with 0), the form ONNX Runtime's fast CPU kernels take (MiniLM batch 1: about 2x
    # faster; same top-1 agreement, logits within about 0.02 of the int8 form); "int8" keeps the graph's form.
    cpu_activations: str = "uint8"
    # openvino, INT8 graphs: the precision of the float parts (attention, LayerNorm, softmax) on the CPU.
    # "auto": bf16 where the CPU computes BF16 natively (AMX, AVX512-BF16), f32 elsewhere. MiniLM on AMX:
    # batch 32 83 -> 70 ms, top-1 agreement with PyTorch 0.9944 -> 0.9966 (benchmarks/NOTES.md).
    openvino_float: str = "auto"
    # openvino, INT8 graphs with self-attention: Q and K in INT8 too (the scores product), from the ranges
    # model.int8.onnx records (export/attention.py). "auto": where the build measures it at least 1% faster
    # over the opt shape and 32 rows (MiniLM on AMD EPYCs without AMX: 1-5%); "int8" or "float" to choose.
    openvino_attention: str = "auto"
    # openvino, INT8 graphs with LSTM layers (float in the QDQ graph): the layers in INT8 where their input
    # has a known bound (engines/openvino_lstm.py). "auto": where the build measures it at least 3% faster
    # over the opt shape and 32 rows (lstm-sentiment on an AMD EPYC without AMX: about 25%); "int8" or "float" to choose.
    openvino_lstm: str = "auto"
    # openvino, models with [batch, seq] inputs that mask padding (a mask input, or the tokenizer's padding id,
    # checked at build): one text a call padded to the next of at most 16 widths and run on a model compiled
    # for that shape (engines/openvino_shapes.py). "auto":
    # where the build measures one text at least 5% faster over three widths (MiniLM on a Zen 5 EPYC: about
    # 20%); "static" or "dynamic" to choose.
    openvino_one_text: str = "auto"
    # openvino, models whose inputs share a batch axis: a call of at least the smallest batch the build times
    # (the opt batch, or 32 rows) is split across streams (the CPU plugin's THROUGHPUT streams, 2 vCPUs: two of
    # one thread), its parts run at once, at the cost of a second compiled model. "auto": unless the build
    # measures it slower over the opt shape and 32 rows (MiniLM on a Zen 5 EPYC: 1-17% faster, most where the
    # machine is busy, which changes by the hour); "split" or "single" to choose.
    openvino_streams: str = "auto"


@dataclass
class BuildResult:
    engine: Path
    sidecar: Path
    metadata: EngineMetadata
    warnings: list[str] = field(default_factory=list)


def default_engine_name(name: str, backend: str, precision: str) -> str:
    return engine_file_name(name, backend, precision, get_backend(backend).suffix)


def timing_cache_path(engine_path: Path) -> Path:
    """Where a backend that keeps a timing cache keeps the one for `engine_path`."""
    return engine_path.with_name(engine_path.name + ".timing-cache")


def default_engine_path(onnx_path: Path, backend: str, precision: str | None, config: Config | None) -> Path:
    """engines/<name>.<backend>.<precision><suffix> beside the ONNX file (its work dir's engines/)."""
    from miaotui.export.inspect_onnx import summarize_onnx

    graph_precision = precision or summarize_onnx(onnx_path).precision
    name = config.name if config else onnx_path.name.split(".")[0]
    return WorkDir(onnx_path.parent).engines_dir / default_engine_name(name, backend, graph_precision)


def _listed(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join(filter(None, [", ".join(items[:-1]), items[-1]]))


def _miaotui_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("miaotui")
    except PackageNotFoundError:
        return "unknown"


def build_engine(onnx_path: str | Path, engine_path: str | Path, options: BuildOptions | None = None,
                 config: Config | None = None, cache_path: Path | None = None) -> BuildResult:
    """Compile `onnx_path` into `engine_path` (+ its .json sidecar) with `options`.

    `config` supplies the shape ranges (its [dims]) and sample value ranges; `cache_path` is where a
    TensorRT timing cache lives (default: beside the engine).
    """
    from miaotui.engines.shapes import resolve_shapes
    from miaotui.export.inspect_onnx import summarize_onnx

    options = options or BuildOptions()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    backend = get_backend(options.backend)
    if options.precision is not None and options.precision not in PRECISIONS:
        raise InputError(f"--precision {options.precision}: expected one of {', '.join(PRECISIONS)}")
    backend.check_options(options)
    if engine_path.suffix != backend.suffix:
        raise InputError(f"-o {engine_path}: a {backend.name} engine is a {backend.suffix} file")
    if not engine_path.parent.is_dir():
        raise InputError(f"-o {engine_path}: folder {engine_path.parent} does not exist")

    summary = summarize_onnx(onnx_path)  # not ONNX, truncated, missing: one line, exit 2
    if options.precision is not None and options.precision != summary.precision:
        raise InputError(f"--precision {options.precision}: {onnx_path} holds a {summary.precision} graph (precision lives "
                         "in the ONNX graph: model.int8.onnx is int8, model.opt.onnx fp32)")
    ranges = resolve_shapes(summary.inputs, config, options.shapes)

    started = time.perf_counter()
    sidecar = sidecar_path(engine_path)
    # Every file is staged beside its final name and renamed only when the block succeeds: a backend's
    # other files (stage_file) first, then the sidecar, then the engine (an ExitStack unwinds in reverse).
    with contextlib.ExitStack() as staged:
        staged_engine = staged.enter_context(atomic_path(engine_path))
        staged_sidecar = staged.enter_context(atomic_path(sidecar))
        onnx_sha = sha256_file(onnx_path)
        job = BuildJob(onnx_path, staged_engine, engine_path.name, options, ranges, summary.precision,
                       tuple(summary.foreign_domains), config, cache_path or timing_cache_path(engine_path),
                       lambda name: staged.enter_context(atomic_path(engine_path.with_name(name))))
        with timing_ledger() as shares:  # each timing's share of the CPUs other processes took (engines/timing.py)
            built = backend.build(job)
        warnings = list(built.warnings)
        if built.timed and shares:
            busy = built.checks["cpu_busy_elsewhere"] = max(shares)  # the busiest timing a choice rests on
            if busy > BUSY_ELSEWHERE_WARNING:
                warnings.append(f"{engine_path.name}: other processes took {busy:.0%} of this machine's CPU time while "
                                f"the build timed its {_listed(built.timed)}; what it chose may not be the fastest here: "
                                "rebuild it when the machine is quiet (miaotui run --force, or miaotui build)")
        network = {"onnx_nodes": sum(summary.op_counts.values()), "int8_nodes": summary.int8_nodes,
                   "float_nodes": summary.float_nodes} | built.network
        metadata = EngineMetadata(
            backend=backend.name,
            backend_version=built.version,
            precision=summary.precision,
            engine_file=engine_path.name,
            engine_sha256=sha256_file(staged_engine),
            engine_bytes=staged_engine.stat().st_size,
            onnx_file=str(onnx_path.resolve()),
            onnx_sha256=onnx_sha,
            inputs=ranges,
            outputs=[TensorInfo(t.name, t.dtype, tuple(t.shape)) for t in summary.outputs],
            device=built.device,
            settings=built.settings,
            session=built.session,
            network=network,
            checks=built.checks,
            build_seconds=round(time.perf_counter() - started, 3),
            built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            miaotui_version=_miaotui_version(),
        )
        atomic_write_json(staged_sidecar, metadata.to_json())
    return BuildResult(engine_path, sidecar, metadata, warnings)
