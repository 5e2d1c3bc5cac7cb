"""Engine builders (ONNX Runtime, TensorRT, TensorRT-RTX) and the metadata that travels with an engine."""

from miaotui.engines.build import BuildOptions, BuildResult, build_engine, default_engine_name
from miaotui.engines.metadata import BACKENDS, EngineMetadata, TensorInfo, TensorRange, read_metadata, sidecar_path
from miaotui.engines.tensorrt_engine import TensorRTOptions

__all__ = [
    "BACKENDS",
    "BuildOptions",
    "BuildResult",
    "EngineMetadata",
    "TensorInfo",
    "TensorRTOptions",
    "TensorRange",
    "build_engine",
    "default_engine_name",
    "read_metadata",
    "sidecar_path",
]
