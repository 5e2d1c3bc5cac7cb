"""What an ONNX file holds: inputs, outputs, opset, op counts, and whether it is plain ONNX."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

from miaotui.errors import InputError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # ints are fixed sizes, strings symbolic dims


@dataclass(frozen=True)
class OnnxSummary:
    path: Path
    size_bytes: int  # the .onnx file plus any external data beside it
    opset: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    op_counts: dict[str, int]
    foreign_domains: list[str]  # e.g. com.microsoft: ops that TensorRT's parser does not know


def _tensor_info(value) -> TensorInfo:
    import onnx

    tensor = value.type.tensor_type
    dims = tuple(d.dim_param or d.dim_value for d in tensor.shape.dim)
    return TensorInfo(value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, dims)


def summarize_onnx(path: str | Path) -> OnnxSummary:
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise InputError(f"{path}: not an ONNX model ({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__})") from error
    if not model.HasField("graph") or not model.opset_import:
        raise InputError(f"{path}: not an ONNX model (no graph or opset in it)")
    data_files = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    size = path.stat().st_size + sum((path.parent / f).stat().st_size for f in data_files if (path.parent / f).is_file())
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    initializers = {t.name for t in model.graph.initializer}
    return OnnxSummary(
        path=path,
        size_bytes=size,
        opset=opset,
        inputs=[_tensor_info(v) for v in model.graph.input if v.name not in initializers],
        outputs=[_tensor_info(v) for v in model.graph.output],
        op_counts=dict(collections.Counter(n.op_type for n in model.graph.node).most_common()),
        foreign_domains=sorted({n.domain for n in model.graph.node} - {"", "ai.onnx"}),
    )
