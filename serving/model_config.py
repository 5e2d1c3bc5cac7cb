"""Triton Inference Server's model configuration schema (inference.ModelConfig), from tritonclient.

tritonclient ships the compiled schema as tritonclient/grpc/model_config_pb2.py. Importing it the
usual way runs tritonclient/grpc/__init__.py, which needs grpcio and pins protobuf below 7; the
schema itself needs neither, so the file is loaded on its own (one module, no gRPC client).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from miaotui.errors import InputError

# numpy dtype name -> Triton data type name
TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
}


@functools.cache
def schema():
    """The model_config_pb2 module (ModelConfig, DataType, ModelInstanceGroup, ...)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or spec.origin is None:
        raise InputError("miaotui package --triton needs tritonclient (Triton's model configuration schema): "
                         "pip install 'miaotui[triton]'")
    path = Path(spec.origin).parent / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        raise InputError(f"{path}: missing; this tritonclient does not ship Triton's model configuration schema")
    module_spec = importlib.util.spec_from_file_location("miaotui_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def to_text(config) -> str:
    """A ModelConfig message as the config.pbtxt text Triton reads."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse(text: str, where: str):
    """config.pbtxt text -> ModelConfig, as Triton parses it: unknown fields and bad values are errors."""
    from google.protobuf import text_format

    config = schema().ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise InputError(f"{where}: not a valid Triton model configuration: {error}") from None
    return config
