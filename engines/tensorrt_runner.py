"""Runs a TensorRT or TensorRT-RTX plan on a CUDA GPU, with torch CUDA tensors as buffers, and lists
its layers (TensorRT's engine inspector).

TensorRT 10/11's name-based API: deserialize_cuda_engine, one execution context and CUDA stream per
calling thread (a context holds shapes and addresses: sharing one between threads mixes their
calls), set_input_shape, set_tensor_address, outputs sized from the context, execute_async_v3.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from miaotui.engines.backend import is_torch
from miaotui.engines.metadata import EngineMetadata
from miaotui.errors import InputError


def check_machine(path: Path, metadata: EngineMetadata):
    """The library, its version and a GPU the plan was built for; returns the TensorRT module."""
    from miaotui.cuda import cuda_devices, no_gpu_reason
    from miaotui.engines.tensorrt_engine import FLAVOURS, import_tensorrt

    reason = no_gpu_reason()
    if reason:
        raise InputError(f"{path}: a {metadata.backend} plan runs on an NVIDIA GPU, and {reason}; "
                         "on this machine use the onnxruntime engine (miaotui build --backend onnxruntime)")
    trt = import_tensorrt(metadata.backend)
    built, here = metadata.backend_version, trt.__version__
    parts = FLAVOURS[metadata.backend].plan_version_parts
    same = built.split(".")[:parts] == here.split(".")[:parts]
    if not same and not metadata.settings.get("version_compatible"):
        raise InputError(f"{path}: built with {metadata.backend} {built}, this machine has {here}; plans are tied to "
                         "the version that built them: rebuild the engine here (miaotui build)")
    gpu = cuda_devices()[0]
    targets = metadata.device.get("compute_capabilities")
    if targets is not None and gpu.compute_capability not in targets:
        raise InputError(f"{path}: built for {', '.join(targets)}, this GPU ({gpu.name}) is {gpu.compute_capability}: "
                         f"rebuild with --compute-capability {gpu.compute_capability}")
    built_for = metadata.device.get("compute_capability")
    compatible = metadata.device.get("hardware_compatibility") == "ampere+" and int(gpu.compute_capability[2:]) >= 80
    if built_for and built_for != gpu.compute_capability and not compatible:
        raise InputError(f"{path}: built on a {built_for} GPU, this one ({gpu.name}) is {gpu.compute_capability}: rebuild "
                         "the engine here, or build with --hardware-compatibility ampere+")
    return trt


class TensorRTRunner:
    def __init__(self, path: Path, metadata: EngineMetadata, trt):
        try:
            import torch
        except ImportError:
            raise InputError(f"{path}: running a TensorRT plan needs torch with CUDA for its buffers (pip install torch)") from None
        if not torch.cuda.is_available():
            raise InputError(f"{path}: this torch ({torch.__version__}) has no CUDA; a TensorRT plan needs CUDA buffers")
        self.torch, self.trt = torch, trt
        self.provider = f"{metadata.backend} on {torch.cuda.get_device_name()}"
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise InputError(f"{path}: {metadata.backend} {trt.__version__} could not deserialize this plan "
                             "(damaged, or built by another version): rebuild it")
        self.runtime = runtime  # the engine needs its runtime alive
        self.output_names = [o.name for o in metadata.outputs]
        self._local = threading.local()

    def _context(self):
        if getattr(self._local, "context", None) is None:
            self._local.context = self.engine.create_execution_context()
            self._local.stream = self.torch.cuda.Stream()
        return self._local.context, self._local.stream

    def run(self, arrays: dict[str, object]) -> list:
        torch = self.torch
        context, stream = self._context()
        with torch.cuda.stream(stream):
            inputs = {name: (value if is_torch(value) else torch.from_numpy(value))
                      .to("cuda", non_blocking=True).contiguous() for name, value in arrays.items()}
            for name, tensor in inputs.items():
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            outputs = []
            for name in self.output_names:
                shape = tuple(context.get_tensor_shape(name))
                dtype = torch.from_numpy(self._empty(name)).dtype
                output = torch.empty(shape, dtype=dtype, device="cuda")
                context.set_tensor_address(name, output.data_ptr())
                outputs.append(output)
            ok = context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        if not ok:
            raise RuntimeError("TensorRT's execute_async_v3 failed; see TensorRT's log above")
        return outputs

    def signature(self):
        """What the deserialized plan says of its I/O tensors: names, dtypes, fixed sizes, and the
        bounds of its optimization profile 0 (runtime/engine.py compares the sidecar with them)."""
        from miaotui.engines.backend import TensorSignature

        inputs, outputs = [], []
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            dims = tuple(int(d) for d in self.engine.get_tensor_shape(name))
            dtype = self._empty(name).dtype.name
            is_input = str(self.engine.get_tensor_mode(name)).endswith("INPUT")  # TensorIOMode.INPUT, in both libraries
            bounds = None
            if is_input:
                low, _, high = self.engine.get_tensor_profile_shape(name, 0)
                bounds = tuple((int(a), int(b)) for a, b in zip(low, high))
            described = TensorSignature(name, dtype, tuple(None if d < 0 else d for d in dims), bounds)
            (inputs if is_input else outputs).append(described)
        return inputs, outputs

    def _empty(self, name: str):
        import numpy as np

        return np.empty(0, dtype=self.trt.nptype(self.engine.get_tensor_dtype(name)))


def _layer_precision(entry: dict[str, Any]) -> str:
    """The engine inspector's DETAILED JSON names formats like "Row major linear Int8"."""
    outputs = entry.get("Outputs") or []
    formats = [str(o.get("Format/Datatype", "")) for o in outputs if isinstance(o, dict)]
    return ", ".join(dict.fromkeys(f.rsplit(" ", 1)[-1] for f in formats if f)) or "?"


def plan_layers(metadata: EngineMetadata, engine_path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """(layers, None) from TensorRT's engine inspector, or ([], why not)."""
    from miaotui.cuda import no_gpu_reason
    from miaotui.engines.tensorrt_engine import import_tensorrt
    from miaotui.errors import InputError

    reason = no_gpu_reason()
    if reason:
        return [], f"listing a plan's layers needs a GPU to deserialize it, and {reason}"
    try:
        trt = import_tensorrt(metadata.backend)
    except InputError as error:
        return [], str(error)
    logger = trt.Logger(trt.Logger.ERROR)
    runtime = trt.Runtime(logger)
    plan = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if plan is None:
        return [], f"{metadata.backend} {trt.__version__} could not deserialize the plan (built with {metadata.backend_version})"
    inspector = plan.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = []
    for entry in info.get("Layers", []):  # plain JSON from here on, not TensorRT objects
        if isinstance(entry, dict):
            layers.append({"name": entry.get("Name", "?"), "type": entry.get("LayerType", "?"),
                           "precision": _layer_precision(entry)})
        else:  # built without detailed profiling verbosity: names only
            layers.append({"name": str(entry), "type": "?", "precision": "?"})
    return layers, None
