"""Engines: one module per backend behind one interface (engines/backend.py), the build that writes an
engine and its sidecar, and the sidecar itself."""

from miaotui.engines.backend import Backend, backend_names, default_backends, get_backend
from miaotui.engines.build import BuildOptions, BuildResult, build_engine, default_engine_name
from miaotui.engines.metadata import EngineMetadata, TensorInfo, TensorRange, read_metadata
from miaotui.engines.tensorrt_engine import TensorRTOptions
from miaotui.workdir import sidecar_path

__all__ = [
    "Backend",
    "BuildOptions",
    "BuildResult",
    "EngineMetadata",
    "TensorInfo",
    "TensorRTOptions",
    "TensorRange",
    "backend_names",
    "build_engine",
    "default_backends",
    "default_engine_name",
    "get_backend",
    "read_metadata",
    "sidecar_path",
]
