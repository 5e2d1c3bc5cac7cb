"""The onnxruntime engine: an ORT-format model with the graph optimizations for one execution provider
applied ahead of time, plus the session settings the runtime must load it with.

ONNX Runtime writes the optimized graph itself (SessionOptions.optimized_model_filepath); saving at
ORT_ENABLE_ALL bakes in layout choices for this CPU, so the sidecar records the CPU it was built on.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Instruction sets that change which ONNX Runtime kernels run (and how INT8 rounds).
_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16",
              "asimd", "asimddp", "i8mm", "sve")


@dataclass
class OnnxRuntimeBuild:
    provider: str  # the provider that really runs the session
    requested_provider: str
    session: dict[str, Any]  # what the runtime must set when loading
    device: dict[str, Any]
    warnings: list[str]


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


def build_onnxruntime(onnx_path: Path, engine_path: Path, provider: str = "cpu") -> OnnxRuntimeBuild:
    """Write `engine_path` (.ort) from `onnx_path` with every graph optimization for `provider` applied."""
    import onnxruntime

    from miaotui.errors import InputError

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
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{onnx_path}: ONNX Runtime could not load the model ({message})") from None
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
    return OnnxRuntimeBuild(actual, requested, session_settings, device, warnings)
