"""TensorRT's own ONNX parser and builder, as the judge that an ONNX file is TensorRT-ready.

TensorRT-RTX builds ahead of time without a GPU, so it runs here; its builder API is TensorRT 11's
(strongly typed networks, optimization profiles). This is a test helper, not the engine builder.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from miaotui.config import Config


def tensorrt_rtx():
    try:
        import tensorrt_rtx_bindings as trt
    except ImportError as error:  # pragma: no cover - part of the [dev] extra
        pytest.skip(f"TensorRT-RTX is not installed ({error}); pip install -e '.[dev]'")
    return trt


# Profiles both built-in INT8 graphs must build with (issue 23): (batch max, seq min, seq max).
PROFILES = ((1, 1, 128), (32, 4, 128), (64, 4, 256))


def build_with_tensorrt_rtx(onnx_path: Path, config: Config) -> int:
    """Parse and build a strongly typed engine with the config's dims as the profile; plan bytes."""
    trt = tensorrt_rtx()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise AssertionError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    builder_config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name in config.inputs:
        shapes = [config.shape_at(name, config.sizes(which)) for which in ("min", "opt", "max")]
        profile.set_shape(name, *shapes)
    builder_config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, builder_config)
    assert plan is not None, f"TensorRT-RTX could not build {onnx_path}"
    return plan.nbytes
