"""FP32 (or INT8 QDQ) graph -> FP16 graph: the float arithmetic in half precision, inputs and outputs
as they were, the ops that overflow or lose accuracy in FP16 kept in FP32 behind Cast nodes.

TensorRT 10/11 builds strongly typed networks: the types in the ONNX graph are the engine's precisions,
so this conversion is what "FP16" and "INT8+FP16" mean for a TensorRT engine. For an INT8 QDQ graph
the Q/DQ scales become FP16 as well, so the dequantized tensors feed FP16 MatMuls directly.

The converter is ONNX Runtime's (onnxruntime.transformers.float16), a maintained fork of
onnxconverter-common's: the same algorithm, already installed with onnxruntime, and measured here on
minilm-sentiment in 2 s where onnxconverter-common 1.16 had not finished after 12 minutes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

# Kept in FP32 (the converter casts around them), each for a reason:
FP32_OPS = (
    "LayerNormalization",  # mean/variance over the hidden size: the classic FP16 failure
    "Softmax",  # exp of unbounded scores, sums of many small terms
    "ReduceSum", "ReduceMean", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",  # long sums (pooling)
    "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Erf",  # overflow / underflow at modest inputs
    "Clip",  # eps guards such as clamp(min=1e-9) underflow to 0 in FP16, then a division by zero
)
FP16_MAX = 65504.0  # the largest finite FP16 value
FP16_TINY = 5.96e-08  # the smallest positive FP16 (subnormal) value


@dataclass
class Fp16Report:
    fp16_nodes: int = 0  # compute nodes that now run in FP16
    fp32_nodes: dict[str, int] = field(default_factory=dict)  # kept in FP32, by op type
    casts_added: int = 0
    initializers_converted: int = 0
    values_clamped: int = 0  # initializer values outside FP16's range, clamped by the converter
    values_flushed: int = 0  # tiny non-zero values the converter rounds to FP16's smallest


# Ops that move or index data without float arithmetic: not counted as FP16 compute.
_NOT_ARITHMETIC = {"Shape", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Concat", "Gather", "Slice", "Cast",
                   "Range", "Constant", "Expand", "Equal", "Not", "Where", "QuantizeLinear", "DequantizeLinear",
                   "Identity", "Flatten", "Split", "GatherElements", "ConstantOfShape"}


def _out_of_fp16_range(model) -> tuple[int, int]:
    """(float initializer values beyond FP16's largest, tiny non-zero ones below its smallest)."""
    from onnx import TensorProto, numpy_helper

    clamped = flushed = 0
    for tensor in model.graph.initializer:
        if tensor.data_type != TensorProto.FLOAT:
            continue
        values = np.abs(numpy_helper.to_array(tensor))
        clamped += int((values > FP16_MAX).sum())
        flushed += int(((values > 0) & (values < FP16_TINY)).sum())
    return clamped, flushed


def convert_to_fp16(model, fp32_ops: tuple[str, ...] = FP32_OPS):
    """(the FP16 model, what changed). `model` is an onnx.ModelProto, left as it was unless it is over
    protobuf's 2 GB limit (then it cannot be copied and is converted in place)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    before = Counter(n.op_type for n in model.graph.node)
    clamped, flushed = _out_of_fp16_range(model)
    # Shape inference runs inside the converter; it needs the model under protobuf's 2 GB limit.
    large = model.ByteSize() > 1_800_000_000
    converted = convert_float_to_float16(onnx.ModelProto.FromString(model.SerializeToString()) if not large else model,
                                         keep_io_types=True, op_block_list=list(fp32_ops),
                                         disable_shape_infer=large)
    # The converter appends the Casts it adds at the end of the node list; ONNX wants them in order.
    OnnxModel(converted).topological_sort()
    after = Counter(n.op_type for n in converted.graph.node)
    report = Fp16Report(
        fp16_nodes=sum(n for op, n in before.items() if op not in fp32_ops and op not in _NOT_ARITHMETIC),
        fp32_nodes={op: n for op, n in before.items() if op in fp32_ops},
        casts_added=after["Cast"] - before["Cast"],
        initializers_converted=sum(t.data_type == onnx.TensorProto.FLOAT16 for t in converted.graph.initializer),
        values_clamped=clamped,
        values_flushed=flushed,
    )
    return converted, report

