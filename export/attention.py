"""Self-attention in INT8 for the backends that run it faster: where to quantize, with which ranges.

A block is softmax(Q x K^T * c + mask) x V with Q, K and V computed (both products have activations on
both sides). The QDQ graph keeps these products in float (quantize_rules: rule-activation-matmul): in
ONNX Runtime's CPU form they run inside QAttention in float anyway. OpenVINO's CPU plugin runs the
whole block as one fused kernel, with Q x K^T in INT8 when Q and K are quantized: on an AMD EPYC
without AMX, minilm-sentiment's batch 32 went about 5% faster (benchmarks/NOTES.md). So the
quantize stage calibrates Q, K and V where the projections write them and records each block with
its ranges in model.int8.onnx's metadata (METADATA_KEY), and the openvino backend builds the INT8
form (int8_attention_graph) and keeps it where it measures faster.

Q, K and V are traced back from the products through the head split (Reshape, Transpose, ...) and a
scalar scale to the tensor the projection wrote: a per-tensor INT8 step there is the same as at the
product (a per-tensor scale commutes with moving data and with a scalar multiply), and there a
backend can fuse the quantization into the projection (OpenVINO's FullyConnected writes INT8). Only
the scores product is quantized (INT8_PARTS): the probabilities are softmax outputs in [0, 1], and
UINT8 with step 1/255 (what OpenVINO's and NNCF's INT8 attention use) rounds the many small ones of a
128-token row to 0, 1 or 2 steps: on minilm-sentiment that step made most of INT8 attention's error
(logit-margin error RMS against PyTorch 0.049 float, 0.0525 with Q and K in INT8, 0.070 with V and the
probabilities too) and none of its speed (both forms timed alike, 5% ahead of float at batch 32;
benchmarks/NOTES.md, thirteenth session). V stays float with them; its range is recorded all the same.
Written by hand: no library records ranges for a backend to apply later.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

METADATA_KEY = "miaotui.int8_attention"
FORMAT = 1
INT8_MAX = 127
INT8_PARTS = ("query", "key")  # what int8_attention_graph quantizes (the module's docstring says why)
MOVE_OP_TYPES = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")
SCORE_OP_TYPES = ("Add", "Sub", "Mul", "Div", "Where", "Cast")  # scale and mask between Q x K^T and softmax


@dataclass(frozen=True)
class AttentionBlock:
    query: str  # the tensors the projections write (before the head split)
    key: str
    value: str
    probabilities: str  # the softmax output
    scores_matmul: str  # node names of Q x K^T and of probabilities x V
    context_matmul: str


@dataclass(frozen=True)
class RangedBlock:
    block: AttentionBlock
    scales: dict[str, float]  # query/key/value -> symmetric INT8 step (|range| / 127)


def find_blocks(model) -> list[AttentionBlock]:
    """Each softmax(Q K^T ...) V of `model` (an onnx.ModelProto) whose Q, K and V trace back to a
    computed tensor that only the block reads."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    constants = set(initializers) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def is_activation_matmul(node) -> bool:
        return node.op_type == "MatMul" and not any(name in constants for name in node.input[:2])

    def scalar(name: str) -> bool:
        if name not in constants:
            return False
        if name in initializers:
            return numpy_helper.to_array(initializers[name]).size == 1
        node = producers[name]
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        return value is not None and numpy_helper.to_array(value).size == 1

    def projection_output(tensor: str) -> str | None:
        """The tensor a projection wrote, before data movement and scalar scaling; None when it is
        read by anything else (quantizing it would change that reader too)."""
        while tensor in producers:
            node = producers[tensor]
            if node.op_type in MOVE_OP_TYPES:
                upstream = node.input[0]
            elif node.op_type in ("Mul", "Div") and scalar(node.input[1]):
                upstream = node.input[0]
            elif node.op_type == "Mul" and scalar(node.input[0]):
                upstream = node.input[1]
            else:
                break
            if len(consumers.get(upstream, [])) != 1 or upstream in outputs:
                return None
            tensor = upstream
        if tensor not in producers or tensor in constants or tensor in outputs or len(consumers.get(tensor, [])) != 1:
            return None
        return tensor

    def scores_matmul(tensor: str, depth: int = 0):
        node = producers.get(tensor)
        if node is None or depth > 6:
            return None
        if is_activation_matmul(node):
            return node
        if node.op_type not in SCORE_OP_TYPES:
            return None
        for name in node.input:
            if name and name not in constants:
                found = scores_matmul(name, depth + 1)
                if found is not None:
                    return found
        return None

    blocks = []
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        probabilities = softmax.output[0]
        readers = consumers.get(probabilities, [])
        if len(readers) != 1 or not is_activation_matmul(readers[0]) or readers[0].input[0] != probabilities:
            continue
        context, scores = readers[0], scores_matmul(softmax.input[0])
        if scores is None or probabilities in outputs:
            continue
        query, key, value = (projection_output(name) for name in (scores.input[0], scores.input[1], context.input[1]))
        if None in (query, key, value) or len({query, key, value}) != 3:
            continue
        blocks.append(AttentionBlock(query, key, value, probabilities, scores.name, context.name))
    return blocks


def tensors_to_calibrate(blocks: list[AttentionBlock]) -> tuple[str, ...]:
    return tuple(sorted({name for b in blocks for name in (b.query, b.key, b.value)}))


def ranged(blocks: list[AttentionBlock], ranges: dict[str, tuple[float, float]]) -> list[RangedBlock]:
    """The blocks with symmetric INT8 steps from calibrated ranges (a block with a range of zero is left out)."""
    result = []
    for block in blocks:
        scales = {part: max(abs(ranges[getattr(block, part)][0]), abs(ranges[getattr(block, part)][1])) / INT8_MAX
                  for part in ("query", "key", "value")}
        if all(scale > 0 for scale in scales.values()):
            result.append(RangedBlock(block, scales))
    return result


def write_metadata(model, blocks: list[RangedBlock]) -> None:
    """Record the blocks in `model`'s metadata (replacing an earlier record)."""
    entries = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(entries)
    if blocks:
        entry = model.metadata_props.add()
        entry.key = METADATA_KEY
        entry.value = json.dumps({"format": FORMAT, "blocks": [asdict(b.block) | {"scales": b.scales} for b in blocks]})


def read_metadata(model) -> list[RangedBlock]:
    """The blocks `model`'s metadata records; [] when none (or a record this version does not read)."""
    for entry in model.metadata_props:
        if entry.key != METADATA_KEY:
            continue
        try:
            data = json.loads(entry.value)
            if data.get("format") != FORMAT:
                return []
            return [RangedBlock(AttentionBlock(**{k: v for k, v in b.items() if k != "scales"}),
                                {part: float(b["scales"][part]) for part in ("query", "key", "value")})
                    for b in data["blocks"]]
        except (ValueError, KeyError, TypeError):
            return []
    return []


def int8_attention_graph(model, blocks: list[RangedBlock]) -> int:
    """Q/DQ pairs (symmetric INT8) on each block's INT8_PARTS, written into `model` in place. Returns how
    many tensors were quantized."""
    from onnx import helper, numpy_helper

    steps: dict[str, tuple[float, type]] = {}
    for ranged_block in blocks:
        block = ranged_block.block
        for part in INT8_PARTS:
            steps[getattr(block, part)] = (ranged_block.scales[part], np.int8)
    written = {output for node in model.graph.node for output in node.output}
    missing = sorted(set(steps) - written)
    if missing:
        raise ValueError(f"attention tensor {missing[0]!r} is not in the graph")
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        for index, tensor in enumerate(node.output):
            if tensor not in steps:
                continue
            step, dtype = steps[tensor]
            float_name, scale, zero_point = tensor + "_attention_float", tensor + "_attention_scale", tensor + "_attention_zero_point"
            model.graph.initializer.extend([numpy_helper.from_array(np.array(step, np.float32), scale),
                                            numpy_helper.from_array(np.array(0, dtype), zero_point)])
            node.output[index] = float_name
            nodes.append(helper.make_node("QuantizeLinear", [float_name, scale, zero_point], [tensor + "_attention_int8"],
                                          name=tensor + "_attention_quantize"))
            nodes.append(helper.make_node("DequantizeLinear", [tensor + "_attention_int8", scale, zero_point], [tensor],
                                          name=tensor + "_attention_dequantize"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(steps)
