"""ONNX -> engine + sidecar, for any backend: the one entry point the CLI and the build stage share.

Everything that can be checked before a builder runs is checked first (the file is ONNX, its
precision is the one asked for, the shape ranges fit the model, the output folder exists), the engine
and its sidecar are written under temporary names and renamed only when the build and its checks
succeeded: a failure never leaves a partial engine.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from miaotui.artifacts import atomic_path, atomic_write_json, sha256_file
from miaotui.config import PRECISIONS, Config
from miaotui.engines.metadata import BACKENDS, ENGINE_SUFFIX, EngineMetadata, TensorInfo, TensorRange, sidecar_path
from miaotui.engines.tensorrt_engine import TensorRTOptions, check_options, timing_cache_path
from miaotui.errors import CheckFailed, InputError

ENGINE_ATOL = 1e-5  # an onnxruntime engine must answer like ONNX Runtime on its source file


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


@dataclass
class BuildResult:
    engine: Path
    sidecar: Path
    metadata: EngineMetadata
    warnings: list[str] = field(default_factory=list)


def default_engine_name(name: str, backend: str, precision: str) -> str:
    return f"{name}.{backend}.{precision}{ENGINE_SUFFIX[backend]}"


def _miaotui_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("miaotui")
    except PackageNotFoundError:
        return "unknown"


def synthetic_feed(ranges: list[TensorRange], which: str, config: Config | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs at the min/opt/max shapes: values from the config's [inputs] range where it has one,
    else ones for integers (a valid id and an all-ones mask) and normal noise for floats."""
    rng = np.random.default_rng(seed)
    feed = {}
    for tensor in ranges:
        shape = getattr(tensor, which)
        spec = config.inputs.get(tensor.name) if config else None
        dtype = np.dtype(tensor.dtype)
        if spec is not None and spec.range is not None and dtype.kind in "iu":
            feed[tensor.name] = rng.integers(int(spec.range[0]), int(spec.range[1]), shape).astype(dtype)
        elif spec is not None and spec.range is not None and dtype.kind == "f":
            feed[tensor.name] = rng.uniform(spec.range[0], spec.range[1], shape).astype(dtype)
        elif dtype.kind == "b":
            feed[tensor.name] = np.ones(shape, dtype)
        elif dtype.kind in "iu":
            feed[tensor.name] = np.ones(shape, dtype)
        else:
            feed[tensor.name] = rng.standard_normal(shape).astype(dtype)
    if config is not None and "attention_mask" in feed and "input_ids" in feed:
        feed["attention_mask"][...] = 1  # random masks can blank a whole row; the mask is not noise
    return feed


def _max_diff(expected: np.ndarray, actual: np.ndarray) -> float:
    """Largest |difference|; NaN where both are NaN is the same answer (the parity gate judges NaNs)."""
    diff = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
    diff[np.isnan(expected) & np.isnan(actual)] = 0.0
    return float(np.max(diff, initial=0.0)) if not np.isnan(diff).any() else float("nan")


def check_onnxruntime_engine(onnx_path: Path, engine: Path, name: str, session_settings: dict,
                              ranges: list[TensorRange], config: Config | None) -> dict:
    """The engine runs at the min and max shapes, and at opt answers like ONNX Runtime on the source."""
    import onnxruntime

    def session(path: Path, engine_format: bool):
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if engine_format:
            options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel,
                                                       session_settings["graph_optimization_level"])
            options.add_session_config_entry("session.load_model_format", "ORT")
        return onnxruntime.InferenceSession(str(path), options, providers=session_settings["providers"])

    built = session(engine, True)
    for which in ("min", "max"):
        feed = synthetic_feed(ranges, which, config)
        try:
            built.run(None, feed)
        except Exception as error:
            shape = "; ".join(f"{name} {list(value.shape)}" for name, value in feed.items())
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"{onnx_path}: the model fails at the {which} shapes ({shape}): {message}; "
                             "narrow the shape ranges") from None
    feed = synthetic_feed(ranges, "opt", config)
    expected = session(onnx_path, False).run(None, feed)
    actual = built.run(None, feed)
    worst = max(_max_diff(e, a) for e, a in zip(expected, actual))
    if not worst <= ENGINE_ATOL:
        raise CheckFailed(f"{name}: the built engine differs from ONNX Runtime on {onnx_path.name} by {worst:.2e} "
                          f"(bar {ENGINE_ATOL:g}) at the opt shapes")
    return {"vs_onnx_max_abs_diff": worst, "atol": ENGINE_ATOL, "ran_at": ["min", "opt", "max"]}


def cpu_int8_form(onnx_path: Path, folder: Path, activations: str) -> tuple[Path, dict]:
    """The INT8 graph in the form ONNX Runtime's CPU kernels run fastest (engines/cpu_int8.py)."""
    import onnx

    from miaotui.engines.cpu_int8 import activations_to_uint8, drop_unused_initializers, gather_before_dequantize

    if activations not in ("uint8", "int8"):
        raise InputError(f"--cpu-activations {activations}: expected uint8 or int8")
    model = onnx.load(str(onnx_path))
    rewrites = {"gather_before_dequantize": gather_before_dequantize(model)}
    if activations == "uint8":
        rewrites["uint8_activations"] = activations_to_uint8(model)
    if not any(rewrites.values()):
        return onnx_path, rewrites
    drop_unused_initializers(model)
    target = folder / onnx_path.name
    large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit, with room
    onnx.save(model, str(target), save_as_external_data=large, location=target.name + ".data")
    return target, rewrites


def _compare_sources(original: Path, rewritten: Path, ranges: list[TensorRange], config: Config | None) -> float:
    """Max |difference| of ONNX Runtime on the original graph and on its CPU form, at the opt shapes."""
    from miaotui.export.parity import onnxruntime_session

    feed = synthetic_feed(ranges, "opt", config)
    outputs = [onnxruntime_session(path).run(None, feed) for path in (original, rewritten)]
    return max(_max_diff(a, b) for a, b in zip(*outputs))


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
    if options.backend not in BACKENDS:
        raise InputError(f"--backend {options.backend}: expected one of {', '.join(BACKENDS)}")
    if options.precision is not None and options.precision not in PRECISIONS:
        raise InputError(f"--precision {options.precision}: expected one of {', '.join(PRECISIONS)}")
    if options.backend != "onnxruntime":
        check_options(options.backend, options.tensorrt)
    suffix = ENGINE_SUFFIX[options.backend]
    if engine_path.suffix != suffix:
        raise InputError(f"-o {engine_path}: a {options.backend} engine is a {suffix} file")
    if not engine_path.parent.is_dir():
        raise InputError(f"-o {engine_path}: folder {engine_path.parent} does not exist")

    summary = summarize_onnx(onnx_path)  # not ONNX, truncated, missing: one line, exit 2
    if options.precision is not None and options.precision != summary.precision:
        raise InputError(f"--precision {options.precision}: {onnx_path} holds a {summary.precision} graph (precision lives "
                         "in the ONNX graph: model.int8.onnx is int8, model.opt.onnx fp32)")
    if summary.foreign_domains and options.backend != "onnxruntime":
        raise InputError(f"{onnx_path}: ops from {', '.join(summary.foreign_domains)} are ONNX Runtime's own; "
                         f"{options.backend} cannot parse them")
    ranges = resolve_shapes(summary.inputs, config, options.shapes)

    started = time.perf_counter()
    warnings: list[str] = []
    sidecar = sidecar_path(engine_path)
    with atomic_path(engine_path) as staged_engine, atomic_path(sidecar) as staged_sidecar:
        onnx_sha = sha256_file(onnx_path)
        network = {"onnx_nodes": sum(summary.op_counts.values()), "int8_nodes": summary.int8_nodes,
                   "float_nodes": summary.float_nodes}
        if options.backend == "onnxruntime":
            from miaotui.engines.onnxruntime_engine import build_onnxruntime

            import onnxruntime

            with tempfile.TemporaryDirectory(prefix="miaotui-cpu-") as folder:
                source, rewrites = onnx_path, {}
                if options.provider == "cpu" and summary.precision.startswith("int8"):
                    source, rewrites = cpu_int8_form(onnx_path, Path(folder), options.cpu_activations)
                built = build_onnxruntime(source, staged_engine, options.provider)
                warnings += built.warnings
                version, device, session = onnxruntime.__version__, built.device, built.session
                settings = {"graph_optimization_level": "ORT_ENABLE_ALL", "provider": built.provider,
                            "requested_provider": built.requested_provider, "cpu_rewrites": rewrites}
                if rewrites:  # what re-deriving the engine's graph from the source takes (miaotui package)
                    settings["cpu_activations"] = options.cpu_activations
                checks = check_onnxruntime_engine(source, staged_engine, engine_path.name, session, ranges, config)
                if source != onnx_path:  # the rewritten graph is checked above; how far it is from the source:
                    checks["vs_source_onnx_max_abs_diff"] = _compare_sources(onnx_path, source, ranges, config)
        else:
            from miaotui.engines.tensorrt_engine import build_tensorrt

            built = build_tensorrt(options.backend, onnx_path, staged_engine, ranges, options.tensorrt,
                                   cache_path or timing_cache_path(engine_path))
            warnings += built.warnings
            version, device, session = built.backend_version, built.device, {}
            settings = built.settings | ({"timing_cache": built.timing_cache} if built.timing_cache else {})
            network |= {"tensorrt": built.network}
            checks = {"parsed_by": f"{options.backend} {built.backend_version} ONNX parser", "strongly_typed": True}
        metadata = EngineMetadata(
            backend=options.backend,
            backend_version=version,
            precision=summary.precision,
            engine_file=engine_path.name,
            engine_sha256=sha256_file(staged_engine),
            engine_bytes=staged_engine.stat().st_size,
            onnx_file=str(onnx_path.resolve()),
            onnx_sha256=onnx_sha,
            inputs=ranges,
            outputs=[TensorInfo(t.name, t.dtype, tuple(t.shape)) for t in summary.outputs],
            device=device,
            settings=settings,
            session=session,
            network=network,
            checks=checks,
            build_seconds=round(time.perf_counter() - started, 3),
            built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            miaotui_version=_miaotui_version(),
        )
        atomic_write_json(staged_sidecar, metadata.to_json())
    return BuildResult(engine_path, sidecar, metadata, warnings)
