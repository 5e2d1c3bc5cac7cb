"""TensorRT plans, for both flavours: data-centre TensorRT (10/11) and TensorRT-RTX.

One builder where their APIs coincide (strongly typed network, ONNX parser, optimization profile,
workspace limit, builder optimization level, hardware compatibility); each flavour's own parts
where they differ:
- tensorrt: needs a CUDA GPU to build; a timing cache saved beside the engine is reused next time;
  version-compatible plans.
- tensorrt-rtx: builds ahead of time without a GPU for chosen compute capabilities. Its timing cache
  calls are deprecated no-ops that force a GPU query (TensorRT-RTX docs, "Timing Cache Migration"),
  and version-compatible plans need a lean runtime it does not ship, so neither is offered.
Both libraries are imported lazily: the package and its CPU paths run without them.
"""

from __future__ import annotations

import collections
import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miaotui.artifacts import atomic_write_bytes
from miaotui.engines.backend import Backend, BackendBuild, BuildJob
from miaotui.engines.metadata import TensorRange
from miaotui.errors import InputError

HARDWARE_COMPATIBILITY = {"ampere+": "AMPERE_PLUS", "same-compute-capability": "SAME_COMPUTE_CAPABILITY"}
# NVIDIA builds Turing (SM75) engines on their own: a portable engine that includes it is slower,
# and some layers (FP32 GEMM in loops) have no Turing kernel at all.
SEPARATE_COMPUTE_CAPABILITIES = ("SM75",)


@dataclass(frozen=True)
class Flavour:
    backend: str
    modules: tuple[str, ...]  # import names, tried in order
    extra: str  # pip install 'miaotui[extra]'
    needs_gpu_to_build: bool
    timing_cache: bool
    compute_capabilities: bool
    version_compatible: bool
    hardware_compatibility: bool
    plan_version_parts: int  # how many leading version parts a plan and the library running it must share


FLAVOURS = {
    "tensorrt": Flavour("tensorrt", ("tensorrt",), "tensorrt", needs_gpu_to_build=True, timing_cache=True,
                        compute_capabilities=False, version_compatible=True, hardware_compatibility=True,
                        plan_version_parts=3),
    "tensorrt-rtx": Flavour("tensorrt-rtx", ("tensorrt_rtx", "tensorrt_rtx_bindings"), "tensorrt-rtx",
                            needs_gpu_to_build=False, timing_cache=False, compute_capabilities=True,
                            version_compatible=False, hardware_compatibility=False, plan_version_parts=2),
}


@dataclass(frozen=True)
class TensorRTOptions:
    workspace_mib: int | None = None  # None: the library's default (all device memory)
    optimization_level: int = 3  # TensorRT's builder optimization level, 0..5
    compute_capabilities: tuple[str, ...] = ()  # tensorrt-rtx: () = every one the library offers from SM80 on
    version_compatible: bool = False  # tensorrt: plans that later TensorRT versions can run
    hardware_compatibility: str | None = None  # "ampere+" | "same-compute-capability"


@dataclass
class TensorRTBuild:
    backend_version: str
    device: dict[str, Any]
    settings: dict[str, Any]
    network: dict[str, Any]
    timing_cache: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def import_tensorrt(backend: str):
    """The flavour's Python module, or one line saying how to get it."""
    flavour = FLAVOURS[backend]
    for name in flavour.modules:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
        except OSError as error:  # the bindings import but their shared libraries do not load
            raise InputError(f"--backend {backend}: {name} is installed but its libraries do not load ({error})") from None
    raise InputError(f"--backend {backend}: {flavour.modules[0]} is not installed here; "
                     f"pip install 'miaotui[{flavour.extra}]'")


def offered_compute_capabilities(trt) -> list[str]:
    return [name for name in trt.ComputeCapability.__members__ if name.startswith("SM")]


def normalize_compute_capability(text: str) -> str:
    """"SM89", "sm_89", "8.9" and "89" all mean SM89."""
    digits = text.strip().upper().removeprefix("SM").lstrip("_").replace(".", "")
    return f"SM{digits}" if digits.isdigit() else text


def check_options(backend: str, options: TensorRTOptions) -> None:
    """Options the flavour cannot honour are refused before anything is built."""
    flavour = FLAVOURS[backend]
    if options.compute_capabilities and not flavour.compute_capabilities:
        raise InputError(f"--compute-capability is for --backend tensorrt-rtx; {backend} builds for the GPU it runs on "
                         "(see --hardware-compatibility)")
    if options.version_compatible and not flavour.version_compatible:
        raise InputError(f"--version-compatible: {backend} cannot build version-compatible plans (it ships no lean runtime)")
    if options.hardware_compatibility and not flavour.hardware_compatibility:
        raise InputError("--hardware-compatibility is for --backend tensorrt; tensorrt-rtx chooses GPUs with --compute-capability")
    if options.hardware_compatibility and options.hardware_compatibility not in HARDWARE_COMPATIBILITY:
        raise InputError(f"--hardware-compatibility {options.hardware_compatibility}: expected one of "
                         f"{', '.join(HARDWARE_COMPATIBILITY)}")
    if not 0 <= options.optimization_level <= 5:
        raise InputError(f"--opt-level {options.optimization_level}: expected 0..5")
    if options.workspace_mib is not None and options.workspace_mib < 1:
        raise InputError(f"--workspace {options.workspace_mib}: expected a positive number of MiB")


def _recording_logger(trt):
    class RecordingLogger(trt.ILogger):
        """Keeps the builder's errors for the one-line message; its warnings stay quiet."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, message):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(message).strip())
            elif int(severity) == int(trt.ILogger.Severity.WARNING):
                self.warnings.append(str(message).strip())

    return RecordingLogger()


def _parser_errors(parser, onnx_path: Path) -> str:
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = error.node()
        where = f"node {node} '{error.node_name()}' ({error.node_operator()})" if node >= 0 else "the model"
        errors.append(f"{where}: {error.desc()}")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{onnx_path}: TensorRT's ONNX parser rejected {errors[0] if errors else 'the file'}{more}"


def _network_summary(network) -> dict[str, Any]:
    """Layer counts by type and by output type: what TensorRT will compile, known without a GPU."""
    by_type: collections.Counter = collections.Counter()
    by_dtype: collections.Counter = collections.Counter()
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        by_type[str(layer.type).rsplit(".", 1)[-1]] += 1
        if layer.num_outputs:
            by_dtype[str(layer.get_output_type(0)).rsplit(".", 1)[-1]] += 1
    return {"layers": network.num_layers, "by_type": dict(by_type.most_common()),
            "by_output_type": dict(by_dtype.most_common())}


def _set_compute_capabilities(trt, builder_config, requested: tuple[str, ...]) -> list[str]:
    """`requested` is already checked against what the library offers."""
    offered = offered_compute_capabilities(trt)
    wanted = [normalize_compute_capability(c) for c in requested] or [
        c for c in offered if c not in SEPARATE_COMPUTE_CAPABILITIES]
    wanted = list(dict.fromkeys(wanted))
    builder_config.num_compute_capabilities = len(wanted)
    for index, name in enumerate(wanted):
        builder_config.set_compute_capability(getattr(trt.ComputeCapability, name), index)
    return wanted


def build_tensorrt(backend: str, onnx_path: Path, engine_path: Path, ranges: list[TensorRange],
                   options: TensorRTOptions, cache_path: Path | None = None) -> TensorRTBuild:
    """Parse `onnx_path`, build a strongly typed plan for `ranges` and write it to `engine_path`."""
    from miaotui.cuda import cuda_devices, no_gpu_reason

    check_options(backend, options)
    flavour = FLAVOURS[backend]
    trt = import_tensorrt(backend)
    if flavour.needs_gpu_to_build and (reason := no_gpu_reason()):
        raise InputError(f"--backend {backend}: building a TensorRT plan needs a CUDA GPU, and {reason}; "
                         "without one, build --backend tensorrt-rtx (ahead of time) or onnxruntime")
    if options.compute_capabilities:  # an unknown name fails before the parse, not after
        offered = offered_compute_capabilities(trt)
        for name in map(normalize_compute_capability, options.compute_capabilities):
            if name not in offered:
                raise InputError(f"--compute-capability {name}: TensorRT-RTX {trt.__version__} offers {', '.join(offered)}")

    logger = _recording_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise InputError(_parser_errors(parser, onnx_path))

    builder_config = builder.create_builder_config()
    builder_config.builder_optimization_level = options.optimization_level
    # Layer names and precisions stay in the plan, for `miaotui inspect` (engine inspector).
    builder_config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if options.workspace_mib is not None:
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    profile = builder.create_optimization_profile()
    for tensor in ranges:
        profile.set_shape(tensor.name, tensor.min, tensor.opt, tensor.max)
    builder_config.add_optimization_profile(profile)

    settings: dict[str, Any] = {"optimization_level": options.optimization_level, "workspace_mib": options.workspace_mib,
                                "strongly_typed": True}
    if flavour.compute_capabilities:
        targets = _set_compute_capabilities(trt, builder_config, options.compute_capabilities)
        device = {"kind": "gpu", "compute_capabilities": targets}
    else:
        gpu = cuda_devices()[0]
        device = {"kind": "gpu", "gpu": gpu.name, "compute_capability": gpu.compute_capability}
    if options.version_compatible:
        builder_config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        settings["version_compatible"] = True
    if options.hardware_compatibility:
        builder_config.hardware_compatibility_level = getattr(
            trt.HardwareCompatibilityLevel, HARDWARE_COMPATIBILITY[options.hardware_compatibility])
        settings["hardware_compatibility"] = options.hardware_compatibility
        device["hardware_compatibility"] = options.hardware_compatibility

    cache_report: dict[str, Any] = {}
    if flavour.timing_cache and cache_path is not None:
        previous = cache_path.read_bytes() if cache_path.is_file() else b""
        timing_cache = builder_config.create_timing_cache(previous)
        builder_config.set_timing_cache(timing_cache, ignore_mismatch=False)
        cache_report = {"file": cache_path.name, "loaded_bytes": len(previous)}

    started = time.perf_counter()
    plan = builder.build_serialized_network(network, builder_config)
    seconds = time.perf_counter() - started
    if plan is None:
        reason = logger.errors[0] if logger.errors else "no reason given"
        raise InputError(f"{onnx_path}: {backend} could not build a plan: {reason}")
    with open(engine_path, "wb") as handle:
        handle.write(memoryview(plan))
    if cache_report:
        serialized = builder_config.get_timing_cache().serialize()
        atomic_write_bytes(cache_path, bytes(memoryview(serialized)))
        cache_report["saved_bytes"] = cache_path.stat().st_size
    settings["builder_seconds"] = round(seconds, 3)
    return TensorRTBuild(trt.__version__, device, settings, _network_summary(network), cache_report)


class TensorRTFamily(Backend):
    """What data-centre TensorRT and TensorRT-RTX share as backends: one builder, one runner; the
    flavour (FLAVOURS) says where they differ."""

    suffix = ".plan"

    @property
    def flavour(self) -> Flavour:
        return FLAVOURS[self.name]

    def version(self) -> str:
        return import_tensorrt(self.name).__version__

    def installed(self) -> bool:
        import importlib.util

        return any(importlib.util.find_spec(module) for module in self.flavour.modules)

    def check_options(self, options) -> None:
        check_options(self.name, options.tensorrt)

    def build(self, job: BuildJob) -> BackendBuild:
        if job.foreign_domains:
            raise InputError(f"{job.onnx_path}: ops from {', '.join(job.foreign_domains)} are ONNX Runtime's own; "
                             f"{self.name} cannot parse them")
        built = build_tensorrt(self.name, job.onnx_path, job.engine_path, job.ranges, job.options.tensorrt,
                               job.cache_path)
        settings = built.settings | ({"timing_cache": built.timing_cache} if built.timing_cache else {})
        checks = {"parsed_by": f"{self.name} {built.backend_version} ONNX parser", "strongly_typed": True}
        return BackendBuild(built.backend_version, built.device, settings, checks, network={"tensorrt": built.network},
                            warnings=built.warnings)

    def cannot_run_here(self) -> str | None:
        from miaotui.cuda import no_gpu_reason

        return no_gpu_reason()

    def check_machine(self, path: Path, metadata) -> None:
        from miaotui.engines.tensorrt_runner import check_machine

        check_machine(path, metadata)

    def open(self, path: Path, metadata, threads: int | None):
        from miaotui.engines.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(path, metadata, import_tensorrt(self.name))

    def describe(self, metadata) -> str:
        targets = metadata.device.get("compute_capabilities") or [metadata.device.get("compute_capability", "?")]
        tensorrt = metadata.network.get("tensorrt", {})
        by_type = tensorrt.get("by_type", {})
        return (f"{metadata.backend} {metadata.backend_version} plan for {', '.join(targets)}; {tensorrt.get('layers', '?')} "
                f"network layers ({by_type.get('QUANTIZE', 0)} Q, {by_type.get('DEQUANTIZE', 0)} DQ); running it needs a GPU")

    def on_gpu(self, metadata) -> bool:
        return True  # a plan runs on the GPU it was built for, always

    def layers(self, path: Path, metadata):
        from miaotui.engines.tensorrt_runner import plan_layers

        return plan_layers(metadata, path)
