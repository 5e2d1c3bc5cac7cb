"""What an ONNX file holds: inputs, outputs, opset, op counts, and whether it is plain ONNX."""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

from miaotui.errors import InputError, first_line


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
    int8_nodes: int = 0  # compute nodes fed only by DequantizeLinear: they run in INT8 (Q/DQ not counted)
    float_nodes: int = 0  # the other compute nodes (Q/DQ and Constant not counted)
    precision: str = "fp32"  # fp32 | fp16 | int8 | int8-fp16, from what the graph holds


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
        raise InputError(f"{path}: not an ONNX model ({first_line(error)})") from error
    if not model.HasField("graph") or not model.opset_import:
        raise InputError(f"{path}: not an ONNX model (no graph or opset in it)")
    data_files = {
        entry.value
        for tensor in model.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    size = path.stat().st_size + sum((path.parent / f).stat().st_size for f in data_files if (path.parent / f).is_file())
    int8_nodes, float_nodes = count_int8_nodes(model)
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
        int8_nodes=int8_nodes,
        float_nodes=float_nodes,
        precision=graph_precision(model),
    )


_QDQ = {"QuantizeLinear", "DequantizeLinear"}
_NOT_COMPUTE = _QDQ | {"Constant"}


def count_int8_nodes(model) -> tuple[int, int]:
    """(INT8, float) compute-node counts. A node runs in INT8 when every input it reads from another
    node comes from a DequantizeLinear (the QDQ pattern TensorRT and ONNX Runtime fuse); shape and
    index inputs (int64 tensors from Shape and friends) do not make it float."""
    import onnx

    producers = {out: node for node in model.graph.node for out in node.output}
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    value_types = {v.name: v.type.tensor_type.elem_type for v in
                   list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    value_types.update({t.name: t.data_type for t in model.graph.initializer})
    constants = {t.name for t in model.graph.initializer}  # a float bias beside DQ'd inputs is folded in
    int8 = floating = 0
    for node in model.graph.node:
        if node.op_type in _NOT_COMPUTE:
            continue
        data_inputs = [name for name in node.input if name and name not in constants
                       and value_types.get(name, onnx.TensorProto.FLOAT) in float_types]
        fed = [producers.get(name) for name in data_inputs]
        if fed and all(p is not None and p.op_type == "DequantizeLinear" for p in fed):
            int8 += 1
        else:
            floating += 1
    return int8, floating


def graph_precision(model) -> str:
    """What precision the graph itself holds: Q/DQ nodes make it int8, FP16 tensors fp16."""
    import onnx

    quantized = any(n.op_type in _QDQ for n in model.graph.node)
    fp16 = onnx.TensorProto.FLOAT16
    half = any(t.data_type == fp16 for t in model.graph.initializer) or any(
        v.type.tensor_type.elem_type == fp16 for v in model.graph.value_info)
    return {(False, False): "fp32", (False, True): "fp16", (True, False): "int8", (True, True): "int8-fp16"}[(quantized, half)]
