"""Runs an onnxruntime engine (.ort) with the session settings its sidecar names.

One InferenceSession serves every thread: ONNX Runtime's run() is safe to call concurrently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from miaotui.engines.metadata import EngineMetadata
from miaotui.errors import InputError
from miaotui.runtime.inputs import is_torch


def check_machine(path: Path, metadata: EngineMetadata) -> None:
    """The engine was built for an instruction set and provider this machine must have."""
    import onnxruntime

    from miaotui.engines.onnxruntime_engine import cpu_description

    built, here = metadata.backend_version, onnxruntime.__version__
    if _version(here) < _version(built):
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


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


class OnnxRuntimeBackend:
    def __init__(self, path: Path, metadata: EngineMetadata, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        level = metadata.session.get("graph_optimization_level", "ORT_DISABLE_ALL")
        options.graph_optimization_level = getattr(onnxruntime.GraphOptimizationLevel, level)
        options.add_session_config_entry("session.load_model_format", metadata.session.get("format", "ORT"))
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = metadata.session.get("providers", ["CPUExecutionProvider"])
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as error:  # ORT raises its own exception types for unreadable files
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"{path}: ONNX Runtime cannot load this engine ({message}): rebuild it") from None
        self.provider = self.session.get_providers()[0]  # what really runs (onnxruntime-gpu may fall back to CPU)
        self.threads = threads
        self.output_names = [o.name for o in metadata.outputs]

    def run(self, arrays: dict[str, object]) -> list[np.ndarray]:
        feed = {name: value.cpu().numpy() if is_torch(value) else value for name, value in arrays.items()}
        return self.session.run(self.output_names, feed)
