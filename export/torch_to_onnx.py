"""torch.nn.Module -> ONNX file with the config's dims dynamic, checked by onnx.checker.

The exporter is torch.onnx's dynamo path (torch.export + onnxscript), the default in torch 2.9+: the
TorchScript path is deprecated. Dynamic dims are torch.export.Dim objects with the config's min/max,
so the graph carries the dims' names (batch, seq) as symbolic sizes.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from miaotui.config import DEFAULT_OPSET, Config
from miaotui.data.samples import trace_sizes
from miaotui.errors import InputError, MiaotuiError

# The protobuf limit: ONNX files whose weights pass it must keep them in an external data file.
PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    # Weights above this many bytes go to model.onnx.data (lowered in tests to exercise the path).
    external_data_threshold: int = PROTOBUF_LIMIT


def dynamic_shapes(config: Config) -> dict[str, dict[int, object]]:
    import torch

    torch_dims = {
        name: torch.export.Dim(name, min=dim.min, max=dim.max) for name, dim in config.dims.items() if not dim.is_static
    }
    shapes: dict[str, dict[int, object]] = {}
    for name, spec in config.inputs.items():
        shapes[name] = {axis: torch_dims[d] for axis, d in enumerate(spec.shape) if isinstance(d, str) and d in torch_dims}
    return shapes


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def export_to_onnx(model, config: Config, destination: Path, options: ExportOptions) -> Path:
    """Export `model` to `destination` (weights beside it in `<name>.data` when large)."""
    import onnx
    import torch

    from miaotui.data.samples import sample_inputs

    _check_forward_arguments(model, config)
    feed = {k: torch.from_numpy(v) for k, v in sample_inputs(config, trace_sizes(config)).items()}
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    parameter_bytes += sum(b.numel() * b.element_size() for b in model.buffers())

    _forget_recurrent_dispatch()
    captured = io.StringIO()
    # torch.onnx logs a warning per missing torchvision op on every export; irrelevant here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        # The exporter prints progress lines and warnings of its own; they are kept out of the
        # user's terminal and shown only with an error.
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), torch.inference_mode(False):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                args=(),
                kwargs=feed,
                dynamo=True,
                opset_version=options.opset,
                dynamic_shapes=dynamic_shapes(config),
                output_names=list(config.model.outputs),
                verbose=False,
            )
    except TypeError as error:
        if "argument" in str(error):
            raise InputError(
                f"{config.path}: inputs: the names {', '.join(config.inputs)} do not match the model's forward() "
                f"arguments ({_first_line(error)})"
            ) from error
        raise MiaotuiError(f"{config.name}: torch.onnx.export failed: {_first_line(error)}") from error
    except Exception as error:
        raise MiaotuiError(f"{config.name}: torch.onnx.export failed: {_first_line(error)}") from error

    _check_io_names(program.model, config)
    program.save(str(destination), external_data=parameter_bytes > options.external_data_threshold)
    try:
        onnx.checker.check_model(str(destination), full_check=True)
    except Exception as error:
        raise MiaotuiError(f"{destination}: onnx.checker rejected the exported graph: {_first_line(error)}") from error
    return destination


def _forget_recurrent_dispatch() -> None:
    """torch.onnx's exporter swaps in a while_loop decomposition of aten.lstm / aten.gru for each
    export (the sequence dim stays dynamic) and restores the old kernels after, but the ops' dispatch
    caches keep the first choice made outside that swap: a second export of an LSTM model in one
    process then unrolled the loop and fixed `seq` at the trace size (torch 2.13). Clearing the two
    caches makes every export see the swap."""
    import torch

    for op in (torch.ops.aten.lstm.input, torch.ops.aten.gru.input):
        cache = getattr(op, "_dispatch_cache", None)
        if cache is not None:
            cache.clear()


def _check_forward_arguments(model, config: Config) -> None:
    """Config inputs are passed by name: each must be a forward() argument, and every required
    argument must be an input."""
    parameters = inspect.signature(model.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [n for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)]
    unknown = [n for n in config.inputs if n not in accepted]
    required = [n for n in accepted if parameters[n].default is parameters[n].empty and n not in config.inputs]
    if unknown or required:
        problem = f"{unknown[0]!r} is not an argument" if unknown else f"argument {required[0]!r} has no input"
        raise InputError(
            f"{config.path}: inputs: {problem} of {type(model).__name__}.forward({', '.join(accepted)})"
        )


def _check_io_names(ir_model, config: Config) -> None:
    inputs = [v.name for v in ir_model.graph.inputs]
    outputs = [v.name for v in ir_model.graph.outputs]
    if sorted(inputs) != sorted(config.inputs):
        raise InputError(
            f"{config.path}: inputs: the exported graph takes {', '.join(inputs)}, the config names "
            f"{', '.join(config.inputs)}"
        )
    if outputs != list(config.model.outputs):
        raise InputError(
            f"{config.path}: model.outputs: the model returns {len(outputs)} output(s), the config names "
            f"{len(config.model.outputs)} ({', '.join(config.model.outputs)})"
        )
