"""Rewrites of an INT8 QDQ graph for ONNX Runtime's CPU kernels; the same quantization, a faster form.

- Dequantize after a lookup: `Gather(DequantizeLinear(table), ids)` dequantizes the whole embedding
  table on every call (MiniLM's 30k x 384 words: a third of the batch-1 latency). Gathering the int8
  rows first and dequantizing only them gives the same floats, exactly (per-tensor scale).
- Activations as uint8: TensorRT wants symmetric int8 (zero point 0); ONNX Runtime's fast CPU
  kernels (MatMulIntegerToFloat, QLinear*) are written for uint8 activations x int8 weights. int8 with
  zero point 0 and uint8 with zero point 128 are the same grid (q_u8 = q_s8 + 128), so the dequantized
  values do not change; ONNX Runtime's fused kernels round their float accumulation differently, which
  the parity gate judges against PyTorch.
- Biases inside the INT8 MatMul: ONNX Runtime turns `DequantizeLinear x DequantizeLinear -> MatMul`
  into its MatMulIntegerToFloat but leaves the bias Add after it (and a second constant Add, such as
  the FFN shift's compensation) as a pass over the whole activation. Written as MatMulIntegerToFloat
  with its bias input, the kernel adds the (summed) bias while it writes the result. MiniLM batch 32:
  36 Adds gone, about 10% of the latency.
Written by hand: ONNX Runtime's own tools quantize from float (they cannot re-express a QDQ graph),
and its optimizer keeps DequantizeLinear on initializers by design.
"""

from __future__ import annotations

import numpy as np

UINT8_ZERO_POINT = "miaotui_activation_zero_point_uint8"


def _initializers(model) -> dict:
    return {t.name: t for t in model.graph.initializer}


def gather_before_dequantize(model) -> int:
    """DequantizeLinear(table) -> Gather/Slice becomes Gather/Slice(table) -> DequantizeLinear. Returns
    how many lookups were rewritten (only per-tensor scales: a per-axis scale would have to be gathered too)."""
    from onnx import helper, numpy_helper

    initializers = _initializers(model)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rewritten = 0
    for dq in [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers]:
        scale = numpy_helper.to_array(initializers[dq.input[1]])
        users = consumers.get(dq.output[0], [])
        if scale.size != 1 or not users or any(u.op_type not in ("Gather", "Slice") or u.input[0] != dq.output[0]
                                               for u in users):
            continue
        if any(o.name == dq.output[0] for o in model.graph.output):
            continue
        for user in users:
            lookup_out = user.output[0] + "_int8"
            new_lookup = helper.make_node(user.op_type, [dq.input[0], *user.input[1:]], [lookup_out],
                                          name=user.name + "_int8")
            new_lookup.attribute.extend(user.attribute)
            new_dq = helper.make_node("DequantizeLinear", [lookup_out, *dq.input[1:]], [user.output[0]],
                                      name=user.name + "_dequantize")
            index = list(model.graph.node).index(user)
            model.graph.node.remove(user)
            model.graph.node.insert(index, new_dq)
            model.graph.node.insert(index, new_lookup)
            rewritten += 1
        model.graph.node.remove(dq)
    return rewritten


def activations_to_uint8(model) -> int:
    """Every activation QuantizeLinear / DequantizeLinear (symmetric int8, zero point 0) onto uint8 with
    zero point 128. Returns how many nodes moved; weights (DequantizeLinear of an initializer, or of
    a lookup into one) stay int8."""
    from onnx import numpy_helper

    initializers = _initializers(model)
    producers = {out: node for node in model.graph.node for out in node.output}

    def is_weight(name: str) -> bool:
        # A weight, or int8 rows looked up from one (gather_before_dequantize's output).
        node = producers.get(name)
        return name in initializers or (node is not None and node.op_type in ("Gather", "Slice")
                                        and node.input[0] in initializers)

    moved = 0
    for node in model.graph.node:
        activation = node.op_type == "QuantizeLinear" or (node.op_type == "DequantizeLinear" and not is_weight(node.input[0]))
        if not activation or len(node.input) < 3:
            continue
        zero_point = numpy_helper.to_array(initializers[node.input[2]])
        if zero_point.dtype != np.int8 or zero_point.size != 1 or int(zero_point) != 0:
            return 0  # not the symmetric int8 this rewrite assumes: leave the graph as it is
        node.input[2] = UINT8_ZERO_POINT
        moved += 1
    if moved:
        model.graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), UINT8_ZERO_POINT))
        del model.graph.value_info[:]  # int8 activation types are stale; ONNX Runtime infers them again
    return moved


def int8_matmuls_with_bias(model) -> int:
    """`DequantizeLinear(a) x DequantizeLinear(W) -> MatMul -> Add(b1) [-> Add(b2)]` becomes
    com.microsoft.MatMulIntegerToFloat(a, W, scales, zero points, b1 + b2). Only where a has one scale
    and zero point, W is a 2-D int8 initializer with per-tensor or per-column scales, the biases are
    1-D constants of W's column count and nothing else reads the MatMul or a first Add. Returns how
    many MatMuls were rewritten."""
    from onnx import helper, numpy_helper

    initializers = _initializers(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}

    def array(name: str):
        return numpy_helper.to_array(initializers[name]) if name in initializers else None

    replaced: dict[int, object] = {}
    dropped: set[int] = set()
    for matmul in [n for n in model.graph.node if n.op_type == "MatMul"]:
        a_dq, w_dq = producers.get(matmul.input[0]), producers.get(matmul.input[1])
        if a_dq is None or w_dq is None or a_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
            continue
        weights = array(w_dq.input[0])
        a_scale = array(a_dq.input[1])
        if weights is None or weights.ndim != 2 or a_dq.input[0] in initializers or a_scale is None or a_scale.size != 1:
            continue
        w_scale = array(w_dq.input[1])
        axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
        if w_scale is None or (w_scale.size != 1 and (axis not in (1, -1) or w_scale.size != weights.shape[1])):
            continue
        bias, adds, out = np.zeros(weights.shape[1], np.float32), [], matmul.output[0]
        while len(adds) < 2 and len(consumers.get(out, [])) == 1 and out not in graph_outputs:
            add = consumers[out][0]
            constant = array(add.input[1] if add.input[0] == out else add.input[0]) if add.op_type == "Add" else None
            if constant is None or constant.shape != (weights.shape[1],) or constant.dtype != np.float32:
                break
            bias, out = bias + constant, add.output[0]
            adds.append(add)
        if not adds:
            continue
        bias_name = matmul.name + "_bias_fused"
        model.graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), bias_name))
        a_in, w_in = [*a_dq.input, "", ""][:3], [*w_dq.input, "", ""][:3]
        replaced[id(adds[-1])] = helper.make_node(
            "MatMulIntegerToFloat", [a_in[0], w_in[0], a_in[1], w_in[1], a_in[2], w_in[2], bias_name], [out],
            name=matmul.name + "_int8_bias", domain="com.microsoft")
        dropped |= {id(matmul), *(id(add) for add in adds[:-1])}
        for dq in (a_dq, w_dq):
            if len(consumers[dq.output[0]]) == 1 and dq.output[0] not in graph_outputs:
                dropped.add(id(dq))
    if replaced:
        nodes = [replaced.get(id(n), n) for n in model.graph.node if id(n) not in dropped]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replaced)


def drop_unused_initializers(model) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
