"""The onnxruntime backend: an ORT-format model with the graph optimizations for one execution provider
applied ahead of time, plus the session settings the runtime must load it with.

ONNX Runtime writes the optimized graph itself (SessionOptions.optimized_model_filepath); saving at
ORT_ENABLE_ALL bakes in layout choices for this CPU, so the sidecar records the CPU it was built on.
On the CPU an INT8 graph is first rewritten into the form ONNX Runtime's fast kernels take
(engines/cpu_int8.py). On the CPU the build also times the engine at its largest batch whole and in
row slices (engines/call_split.py) and, where slices are faster, records the budget `Engine.run` splits
larger batches by. One InferenceSession serves every thread: ONNX Runtime's run() is safe to call
concurrently.
"""

from __future__ import annotations

import platform
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from miaotui.engines.backend import (Backend, BackendBuild, BuildJob, TensorSignature, numpy_feed, run_failed,
                                     version_tuple)
from miaotui.engines.metadata import EngineMetadata, TensorRange, batch_axis_shared
from miaotui.errors import CheckFailed, InputError, first_line

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
             "tensor(bool)": "bool"}
ENGINE_ATOL = 1e-5  # an onnxruntime engine must answer like ONNX Runtime on its source file
# Instruction sets that change which ONNX Runtime kernels run (and how INT8 rounds).
_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16",
              "asimd", "asimddp", "i8mm", "sve")


def cpu_description() -> dict[str, Any]:
    """The CPU model and the instruction-set flags that matter to ONNX Runtime's kernels."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    return {"kind": "cpu", "cpu": model, "machine": platform.machine(),
            "isa": [flag for flag in _CPU_FLAGS if flag in flags]}


def _save_ort(onnx_path: Path, engine_path: Path, provider: str):
    """Write `engine_path` (.ort) from `onnx_path` with every graph optimization for `provider` applied;
    returns (provider that really runs, session settings, device, warnings)."""
    import onnxruntime

    requested = PROVIDERS[provider]
    if requested not in onnxruntime.get_available_providers():
        raise InputError(f"--provider {provider}: this onnxruntime {onnxruntime.__version__} has no {requested} "
                         f"(it has {', '.join(onnxruntime.get_available_providers())}; for CUDA: pip install onnxruntime-gpu)")
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(engine_path)
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.log_severity_level = 3  # its "hardware specific optimizations" notice is recorded in the sidecar instead
    providers = [requested] + (["CPUExecutionProvider"] if requested != "CPUExecutionProvider" else [])
    try:
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=providers)
    except Exception as error:  # ORT raises its own exception types for invalid graphs
        raise InputError(f"{onnx_path}: ONNX Runtime could not load the model ({first_line(error)})") from None
    actual = session.get_providers()[0]
    warnings = []
    if actual != requested:  # onnxruntime-gpu falls back to CPU without a word
        warnings.append(f"asked for {requested}, but ONNX Runtime runs this model on {actual}: the engine is built for {actual}")
    del session
    device = cpu_description() if actual == "CPUExecutionProvider" else {"kind": "gpu", "provider": actual}
    device |= {"provider": actual, "hardware_specific": True}
    session_settings = {
        # Every optimization is already in the file: loading must not redo them (or undo the ones baked in).
        "graph_optimization_level": "ORT_DISABLE_ALL",
        "providers": [actual] + (["CPUExecutionProvider"] if actual != "CPUExecutionProvider" else []),
        "format": "ORT",
    }
    return actual, requested, session_settings, device, warnings


def _session(path: Path, session_settings: dict, engine_format: bool):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if engine_format:
        options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel,
                                                   session_settings["graph_optimization_level"])
        options.add_session_config_entry("session.load_model_format", "ORT")
    return onnxruntime.InferenceSession(str(path), options, providers=session_settings["providers"])


def _time_call_split(engine: Path, session_settings: dict, ranges: list[TensorRange], config) -> dict | None:
    """The engine timed at its largest batch (and typical rest of the shape), whole and in row slices
    (engines/call_split.py); None where its inputs share no batch axis."""
    from miaotui.engines.call_split import measure_call_split, split_feed

    if not ranges or not batch_axis_shared(ranges):  # the only split Engine.run makes
        return None
    session = _session(engine, session_settings, engine_format=True)
    feed = split_feed(ranges, config)
    chosen, milliseconds, to_whole = measure_call_split(lambda arrays: session.run(None, arrays), feed)
    return {"max_call_elements": chosen, "shape": list(feed[ranges[0].name].shape), "ms": milliseconds,
            "to_whole": to_whole}


def check_engine(onnx_path: Path, engine: Path, name: str, session_settings: dict,
                 ranges: list[TensorRange], config) -> dict:
    """The engine runs at the min and max shapes, and at opt answers like ONNX Runtime on the source."""
    from miaotui.engines.shapes import max_diff, run_at_extremes, synthetic_feed

    built = _session(engine, session_settings, engine_format=True)
    run_at_extremes(lambda feed: built.run(None, feed), ranges, config, str(onnx_path), "the model")
    feed = synthetic_feed(ranges, "opt", config)
    expected = _session(onnx_path, session_settings, engine_format=False).run(None, feed)
    actual = built.run(None, feed)
    worst = max(max_diff(e, a) for e, a in zip(expected, actual))
    if not worst <= ENGINE_ATOL:
        raise CheckFailed(f"{name}: the built engine differs from ONNX Runtime on {onnx_path.name} by {worst:.2e} "
                          f"(bar {ENGINE_ATOL:g}) at the opt shapes")
    return {"vs_onnx_max_abs_diff": worst, "atol": ENGINE_ATOL, "ran_at": ["min", "opt", "max"]}


def cpu_int8_form(onnx_path: Path, folder: Path, activations: str, padding_mask: str | None = None) -> tuple[Path, dict]:
    """The INT8 graph in the form ONNX Runtime's CPU kernels run fastest (engines/cpu_int8.py);
    `padding_mask`: the config's padding-mask input, which a fused attention reads."""
    import onnx

    from miaotui.engines.cpu_int8 import (activations_to_uint8, drop_unused_initializers, fused_int8_attention,
                                          gather_before_dequantize, int8_matmuls_with_bias)

    if activations not in ("uint8", "int8"):
        raise InputError(f"--cpu-activations {activations}: expected uint8 or int8")
    model = onnx.load(str(onnx_path))
    rewrites = {"gather_before_dequantize": gather_before_dequantize(model)}
    if activations == "uint8":
        rewrites["uint8_activations"] = activations_to_uint8(model)
        if rewrites["uint8_activations"]:  # the form ONNX Runtime's fast kernels take; int8 stays as the graph is
            rewrites["int8_matmuls_with_bias"] = int8_matmuls_with_bias(model)
            rewrites["fused_int8_attention"] = fused_int8_attention(model, padding_mask)
    if not any(rewrites.values()):
        return onnx_path, rewrites
    drop_unused_initializers(model)
    target = folder / onnx_path.name
    large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit, with room
    onnx.save(model, str(target), save_as_external_data=large, location=target.name + ".data")
    return target, rewrites


def _compare_sources(original: Path, rewritten: Path, ranges: list[TensorRange], config) -> float:
    """Max |difference| of ONNX Runtime on the original graph and on its CPU form, at the opt shapes."""
    from miaotui.engines.shapes import max_diff, synthetic_feed
    from miaotui.export.parity import onnxruntime_session

    feed = synthetic_feed(ranges, "opt", config)
    outputs = [onnxruntime_session(path).run(None, feed) for path in (original, rewritten)]
    return max(max_diff(a, b) for a, b in zip(*outputs))


# ONNX Runtime's threads keep spinning for a while after a call returns, waiting for the next one. For
# a lone engine that is what makes the next call fast (the LSTM engine, one text 5 ms after the last:
# 0.25 ms with its threads spinning, 0.45 ms with them parked). With two engines in one process called
# in turn (a service with two classifiers) each one's spinning threads take the cores from the other:
# on 2 cores MiniLM's engine ran 2x slower called in turn with the LSTM's. So a session spins on after
# its calls only while it is the process's one live onnxruntime engine; loading a second reopens all of
# them to stop spinning when a call returns (benchmarks/cohost.py, benchmarks/NOTES.md).
STOP_SPINNING_WHEN_SHARED = True
_live_runners: weakref.WeakSet = weakref.WeakSet()
_live_lock = threading.Lock()
_stop_spinning_always = False


def stop_spinning_after_calls() -> None:
    """Every onnxruntime session this process opens from now on parks its threads when a call returns: for a
    process that shares the machine with other engine processes. The Triton text model calls it: with two
    text models in one server, both under load, spinning threads had MiniLM's and the LSTM's engines at
    34-46 / 253-327 texts/s, parked 51-57 / 354-406; a model served alone ran level either way
    (benchmarks/NOTES.md, twelfth session)."""
    global _stop_spinning_always
    _stop_spinning_always = True


class OnnxRuntimeRunner:
    def __init__(self, path: Path, metadata: EngineMetadata, threads: int | None = None):
        self.path, self.metadata, self.threads = path, metadata, threads
        with _live_lock:
            others = list(_live_runners) if STOP_SPINNING_WHEN_SHARED else []
            stop = bool(others) or _stop_spinning_always
            self.session = self._open(stop_spinning=stop)
            self.spinning_stopped = stop
            _live_runners.add(self)
            for runner in others:
                runner._stop_spinning()
        self.provider = self.session.get_providers()[0]  # what really runs (onnxruntime-gpu may fall back to CPU)
        self.output_names = [o.name for o in metadata.outputs]

    def _open(self, stop_spinning: bool, model: bytes | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        level = self.metadata.session.get("graph_optimization_level", "ORT_DISABLE_ALL")
        options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, level)
        options.add_session_config_entry("session.load_model_format", self.metadata.session.get("format", "ORT"))
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        if stop_spinning:
            options.add_session_config_entry("session.force_spinning_stop", "1")
        providers = self.metadata.session.get("providers", ["CPUExecutionProvider"])
        try:
            return onnxruntime.InferenceSession(model or str(self.path), options, providers=providers)
        except Exception as error:  # ORT raises its own exception types for unreadable files
            raise InputError(f"{self.path}: ONNX Runtime cannot load this engine ({first_line(error)}): "
                             "rebuild it") from None

    def _stop_spinning(self) -> None:
        """Reopen the session with threads that stop spinning when a call returns; it is swapped in whole,
        so a call already running finishes on the old one. Only from the very file Engine.load checked:
        one rebuilt or removed since keeps its session as it is."""
        import hashlib

        if self.spinning_stopped:
            return
        try:
            model = self.path.read_bytes()  # hashed and opened from the same bytes
            if hashlib.sha256(model).hexdigest() != self.metadata.engine_sha256:
                return
            self.session = self._open(stop_spinning=True, model=model)
        except (OSError, InputError):
            return
        self.spinning_stopped = True

    def run(self, arrays: dict[str, object]) -> list[np.ndarray]:
        feed = numpy_feed(arrays)
        try:
            return self.session.run(self.output_names, feed)
        except Exception as error:  # ORT's own exception types; the inputs passed the sidecar's checks
            raise run_failed("ONNX Runtime", feed, error) from None

    def signature(self):
        def describe(args):
            return [TensorSignature(a.name, ORT_TYPES.get(a.type, a.type),
                                    tuple(d if isinstance(d, int) else None for d in a.shape)) for a in args]

        return describe(self.session.get_inputs()), describe(self.session.get_outputs())


class OnnxRuntime(Backend):
    name = "onnxruntime"
    runtime_module = "onnxruntime"
    suffix = ".ort"
    help = "onnxruntime (any machine)"
    triton_platform = "onnxruntime_onnx"
    preference = 40
    # 2: INT8 MatMuls take their biases; 3: attention fused (cpu_int8); 4: the build measures a call split (call_split)
    form = "4"

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def builds_by_default(self) -> bool:
        return True

    def build(self, job: BuildJob) -> BackendBuild:
        options = job.options
        with tempfile.TemporaryDirectory(prefix="miaotui-cpu-") as folder:
            source, rewrites = job.onnx_path, {}
            if options.provider == "cpu" and job.precision.startswith("int8"):
                padding_mask = job.config.padding_mask if job.config is not None else None
                source, rewrites = cpu_int8_form(job.onnx_path, Path(folder), options.cpu_activations, padding_mask)
            actual, requested, session, device, warnings = _save_ort(source, job.engine_path, options.provider)
            settings = {"graph_optimization_level": "ORT_ENABLE_ALL", "provider": actual,
                        "requested_provider": requested, "cpu_rewrites": rewrites}
            if rewrites:  # what re-deriving the engine's graph from the source takes (Triton packaging)
                settings["cpu_activations"] = options.cpu_activations
            checks = check_engine(source, job.engine_path, job.engine_name, session, job.ranges, job.config)
            if source != job.onnx_path:  # the rewritten graph is checked above; how far it is from the source:
                checks["vs_source_onnx_max_abs_diff"] = _compare_sources(job.onnx_path, source, job.ranges, job.config)
            # Half-precision graphs are GPU precisions, checked on the CPU but not run there for speed: not timed.
            timed = []
            if actual == "CPUExecutionProvider" and job.precision in ("fp32", "int8"):
                split = _time_call_split(job.engine_path, session, job.ranges, job.config)
                if split is not None:
                    timed.append("call split")
                    checks["call_split"] = split
                    if split["max_call_elements"]:
                        session["max_call_elements"] = split["max_call_elements"]
        return BackendBuild(self.version(), device, settings, checks, session=session, warnings=warnings, timed=timed)

    def check_machine(self, path: Path, metadata: EngineMetadata) -> None:
        """The engine was built for an instruction set and provider this machine must have."""
        import onnxruntime

        built, here = metadata.backend_version, onnxruntime.__version__
        if version_tuple(here) < version_tuple(built):
            raise InputError(f"{path}: built with onnxruntime {built}, this machine has {here}, which cannot read newer "
                             "engines: upgrade onnxruntime or rebuild the engine here (miaotui build)")
        provider = metadata.device.get("provider", "CPUExecutionProvider")
        if provider not in onnxruntime.get_available_providers():
            raise InputError(f"{path}: built for {provider}, which this onnxruntime {here} lacks "
                             f"(it has {', '.join(onnxruntime.get_available_providers())}): rebuild the engine with --provider cpu")
        if metadata.device.get("kind") == "cpu":
            lacking = [flag for flag in metadata.device.get("isa", []) if flag not in cpu_description()["isa"]]
            if lacking:
                raise InputError(f"{path}: built on a CPU with {', '.join(lacking)}, which this CPU lacks; the engine holds "
                                 "kernels chosen for that CPU: rebuild it here (miaotui build)")

    def open(self, path: Path, metadata: EngineMetadata, threads: int | None) -> OnnxRuntimeRunner:
        return OnnxRuntimeRunner(path, metadata, threads)

    def describe(self, metadata: EngineMetadata) -> str:
        checks = metadata.checks
        text = (f"onnxruntime {metadata.backend_version} on {metadata.device.get('provider')}; ran at min/opt/max shapes; "
                f"vs ONNX Runtime on the .onnx max |diff| {checks.get('vs_onnx_max_abs_diff', float('nan')):.0e}")
        rewrites = {k: v for k, v in metadata.settings.get("cpu_rewrites", {}).items() if v}
        if rewrites:
            text += f" (CPU form: {', '.join(f'{k.replace(chr(95), chr(32))} {v}' for k, v in rewrites.items())}"
            if "vs_source_onnx_max_abs_diff" in checks:
                text += f"; vs the source graph {checks['vs_source_onnx_max_abs_diff']:.0e}"
            text += ")"
        return text

    def triton_model(self, engine: Path, metadata: EngineMetadata, target: Path, config) -> str:
        """The graph the engine was built from, re-derived from its source and checked to answer like
        the engine (the engine file itself is ORT format, which Triton's onnxruntime backend does not load)."""
        import shutil

        from miaotui.artifacts import sha256_file

        source = Path(metadata.onnx_file)
        if not source.is_file():
            raise InputError(f"{source}: the engine's source ONNX file (sidecar key 'onnx_file') is missing; "
                             "Triton runs the ONNX graph, so package where it was built")
        if sha256_file(source) != metadata.onnx_sha256:
            raise InputError(f"{source}: changed since {engine.name} was built from it (sha256 differs); rebuild the engine")
        rewrites = {k: v for k, v in metadata.settings.get("cpu_rewrites", {}).items() if v}
        model_file = target / "model.onnx"  # the file name Triton's onnxruntime backend loads
        with tempfile.TemporaryDirectory(prefix="miaotui-triton-") as folder:
            graph = source
            if rewrites:
                activations = metadata.settings.get("cpu_activations", "uint8" if "uint8_activations" in rewrites else "int8")
                padding_mask = config.padding_mask if config is not None else None
                graph, _ = cpu_int8_form(source, Path(folder), activations, padding_mask)
            try:
                check_engine(graph, engine, engine.name, metadata.session, metadata.inputs, config)
            except CheckFailed as error:
                raise CheckFailed(f"the ONNX graph for Triton does not answer like {engine.name}: {error}") from None
            shutil.copyfile(graph, model_file)
            data = graph.with_name(graph.name + ".data")
            if data.is_file():  # external weights keep the name the graph points at
                shutil.copyfile(data, target / data.name)
        return model_file.name


BACKEND = OnnxRuntime()
