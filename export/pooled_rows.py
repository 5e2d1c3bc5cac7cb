"""The pooled token only: a classifier that reads one token of its encoder's last layer computes only that.

A *ForSequenceClassification head that pools the first token (BERT, RoBERTa, DistilBERT, ELECTRA,
DeBERTa: `hidden[:, 0]`, a Gather on the sequence axis) reads one row of the last layer's output, yet
the exported graph computes every row of it. Each row of a transformer layer after its attention
scores (the query projection, the softmax over the keys, the output projection, the residual sums,
the LayerNorms, the feed-forward block) depends on that row alone; only the keys and values need every
token. So the last layer can run its query side and everything after on one row: at sequence 128 that
removes about five sixths of the last layer's matrix work (BERT-style, 6 layers: about 14% of the
encoder's). The answers are the same computation on fewer rows.

Done here on the ONNX graph rather than in the model, so it holds for every family the exporter
writes: demand for rows is traced back from the pooling Gather through the ops whose rows are
independent (elementwise ops with broadcasting, MatMul's rows, Softmax and LayerNormalization across
other axes, Transposes, Reshapes that keep the row axis whole); those nodes are narrowed in place to the
one row and a Slice is put where a narrowed node reads a tensor that something else still reads whole
(the last layer's input, which its keys and values need). Neither onnxruntime's nor OpenVINO's graph
optimizers do this (they keep every row of a tensor that the graph computes), nor onnx-graphsurgeon's
folding, so it is written here. The optimize stage then checks the graph against model.onnx as always.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

# Ops whose every output element depends on the same element of each (broadcast) input.
ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Equal", "Less", "Greater", "And", "Or", "Not",
    "Gelu", "Erf", "Tanh", "Relu", "Sigmoid", "Cast", "Sqrt", "Neg", "Abs", "Exp", "Log", "Reciprocal",
    "Identity", "Clip", "HardSigmoid", "LeakyRelu", "Softplus", "Mish",
})
FULL = None  # a tensor every row of which is needed


@dataclass(frozen=True)
class PooledRowsReport:
    narrowed_nodes: int  # nodes that now compute one row of the sequence axis
    slices: int  # Slice nodes added where a narrowed node reads a tensor others still read whole


def narrow_to_pooled_rows(model) -> PooledRowsReport:
    """Narrow, in place, the nodes whose only use is a first-token pooling (onnx ModelProto with shapes
    inferred: a node is narrowed only where its tensors' shapes are known)."""
    import onnx

    graph = model.graph
    if any(attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for attribute in node.attribute):
        return PooledRowsReport(0, 0)  # tensors read inside subgraphs are not in the consumer lists below
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    shapes = _known_shapes(graph)
    # Held for the whole pass: nodes are keyed by id() below, which is unique only while they are alive.
    nodes = list(graph.node)
    consumers: dict[str, list] = defaultdict(list)
    for node in nodes:
        for name in node.input:
            if name:
                consumers[name].append(node)
    outputs = {output.name for output in graph.output}

    # Demand, walking from the outputs back (the nodes are in topological order): a tensor needs only
    # row 0 of an axis when every reader asks for just that row of it.
    demand: dict[str, int | None] = {}
    rules: dict[int, list[int | None]] = {}  # id(node) -> what each input must supply, for narrowed nodes
    for node in reversed(nodes):
        for name in node.output:
            demand[name] = _combined_demand(name, consumers[name], outputs, rules, constants, shapes)
        wanted = {demand[name] for name in node.output if name}
        if len(wanted) != 1 or FULL in wanted:
            continue
        inputs = _input_demand(node, wanted.pop(), shapes, constants)
        if inputs is not None:
            rules[id(node)] = inputs
    if not rules:
        return PooledRowsReport(0, 0)

    narrowed_tensors = {name for node in nodes if id(node) in rules for name in node.output if name}
    new_nodes, slices = [], {}
    for node in nodes:
        reshape = None
        if id(node) in rules and node.op_type == "Reshape":
            reshape = _reshape_form(shapes.get(node.input[0]), shapes[node.output[0]], demand[node.output[0]])
        for index, axis in enumerate(rules.get(id(node), ())):
            name = node.input[index]
            if axis is FULL or name in narrowed_tensors:
                continue
            if (name, axis) not in slices:
                slices[(name, axis)] = _row_slice(name, axis, new_nodes, graph)
            node.input[index] = slices[(name, axis)]
        if reshape is not None:
            _narrow_reshape(node, reshape, new_nodes, graph)
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    # The narrowed tensors' recorded shapes are stale: drop them for shape inference to write again.
    kept = [info for info in graph.value_info if info.name not in narrowed_tensors]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return PooledRowsReport(len(rules), len(slices))


def _known_shapes(graph) -> dict[str, list]:
    """name -> dims (int, or a symbolic name; None where unknown) for every tensor with a recorded shape."""
    shapes = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                 for d in tensor.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _combined_demand(name, readers, outputs, rules, constants, shapes) -> int | None:
    """The one axis whose row 0 is all that `name`'s readers need, or FULL."""
    if name in outputs or not readers:
        return FULL
    asked = set()
    for reader in readers:
        if id(reader) in rules:
            asked.update(axis for index, axis in enumerate(rules[id(reader)]) if reader.input[index] == name)
        else:
            asked.add(_pooling_axis(reader, name, constants, shapes))
    return asked.pop() if len(asked) == 1 else FULL


def _pooling_axis(node, name, constants, shapes) -> int | None:
    """The axis of which `node` reads only row 0 of `name` (a Gather of index 0, a Slice of [0, 1)), else FULL."""
    from onnx import numpy_helper

    rank = len(shapes.get(name, ()))
    if rank < 2 or node.input[0] != name:
        return FULL
    if node.op_type == "Gather" and node.input[1] in constants:
        axis = _attribute(node, "axis", 0) % rank
        indices = numpy_helper.to_array(constants[node.input[1]])
        return axis if axis > 0 and indices.size and not indices.any() else FULL
    if node.op_type == "Slice" and len(node.input) >= 4 and all(n in constants for n in node.input[1:4]):
        starts, ends, axes = (numpy_helper.to_array(constants[n]).tolist() for n in node.input[1:4])
        steps = numpy_helper.to_array(constants[node.input[4]]).tolist() if len(node.input) > 4 and node.input[4] else [1] * len(axes)
        sliced = {axis % rank: (start, end, step) for axis, start, end, step in zip(axes, starts, ends, steps)}
        picked = [axis for axis, (start, end, step) in sliced.items() if (start, end, step) == (0, 1, 1)]
        return picked[0] if len(picked) == 1 and len(sliced) == 1 and picked[0] > 0 else FULL
    return FULL


def _input_demand(node, axis: int, shapes, constants) -> list[int | None] | None:
    """For a node asked for row 0 of `axis` of its output: which row each input must supply (FULL where
    an input is read whole, a constant or broadcast along that axis), or None where the node cannot be
    narrowed."""
    output = shapes.get(node.output[0])
    if output is None or len(node.output) != 1 or output[axis] in (1, None):
        return None
    rank = len(output)
    op = node.op_type
    if op in ELEMENTWISE:
        return _broadcast_demand(node.input, axis, rank, shapes, constants)
    if op == "Softmax" or op == "LogSoftmax":
        return [axis] if _attribute(node, "axis", -1) % rank != axis else None
    if op == "LayerNormalization":
        first = _attribute(node, "axis", -1) % rank
        return [axis, *[FULL] * (len(node.input) - 1)] if axis < first and all(n in constants for n in node.input[1:] if n) else None
    if op == "Transpose":
        perm = _attribute(node, "perm", list(range(rank))[::-1])
        return [perm[axis]]
    if op == "MatMul":
        if rank < 2 or axis == rank - 1:
            return None
        if axis == rank - 2:  # rows of the product are rows of the left operand
            left = len(shapes.get(node.input[0], ()))
            return [left - 2, FULL] if left >= 2 else None
        return _broadcast_demand(node.input, axis, rank, shapes, constants)
    if op == "Reshape":
        regrouped = _reshape_form(shapes.get(node.input[0]), output, axis)
        return None if regrouped is None else [regrouped[0], FULL]
    return None


def _broadcast_demand(inputs, axis: int, rank: int, shapes, constants) -> list[int | None] | None:
    """Numpy broadcasting: an input with this axis of size > 1 supplies its row 0; one without the axis,
    or with size 1 there, or a constant, is read whole."""
    demand = []
    for name in inputs:
        if not name or name in constants:
            demand.append(FULL)
            continue
        shape = shapes.get(name)
        if shape is None:
            return None
        aligned = axis - (rank - len(shape))
        if aligned < 0 or shape[aligned] == 1:
            demand.append(FULL)
        elif shape[aligned] is None:
            return None
        else:
            demand.append(aligned)
    return demand


def _reshape_form(source: list | None, output: list, axis: int) -> tuple[int, list[int], bool] | None:
    """(the input's axis that becomes `axis`, the target's constant part, whether the input's dims after that
    axis end the target) for a Reshape that keeps row 0 of `axis` a row of its own: either the axes up to
    it kept and the ones after regrouped ([batch, seq, heads, size] -> [batch, seq, hidden]: target 0s,
    then the output's dims after it, at most one unknown as -1), or the ones before it regrouped and it
    and the ones after kept ([batch * heads, seq, size] -> [batch, heads, seq, size], as DeBERTa splits
    its heads: the output's dims before it, at most one unknown, then 1, then the input's own dims after
    it, read at run time). None for any other Reshape."""
    if source is None:
        return None
    if len(source) > axis and source[:axis + 1] == output[:axis + 1] and None not in output[:axis + 1]:
        tail = [d if isinstance(d, int) and d > 0 else -1 for d in output[axis + 1:]]
        return (axis, [0] * (axis + 1) + tail, False) if tail.count(-1) <= 1 else None
    kept = output[axis:]
    first = len(source) - len(kept)
    if first >= 0 and source[first:] == kept and None not in kept:
        lead = [d if isinstance(d, int) and d > 0 else -1 for d in output[:axis]]
        return (first, [*lead, 1], True) if lead.count(-1) <= 1 else None
    return None


def _narrow_reshape(node, form: tuple[int, list[int], bool], nodes: list, graph) -> None:
    """Give a narrowed Reshape its target for the one row (`_reshape_form`; nodes computing it appended to
    `nodes`)."""
    import onnx
    from onnx import numpy_helper

    first, constant, input_tail = form
    name = f"{node.output[0]}__rows0_shape"
    graph.initializer.append(numpy_helper.from_array(np.array(constant, dtype=np.int64), name))
    if input_tail:  # the dims after the row axis as the input has them at run time
        tail = f"{node.output[0]}__rows0_tail"
        nodes.append(onnx.helper.make_node("Shape", [node.input[0]], [tail], start=first + 1))
        nodes.append(onnx.helper.make_node("Concat", [name, tail], [name + "_full"], axis=0))
        name += "_full"
    node.input[1] = name
    # The target's zeros copy the input's dims (the exporter writes allowzero=1: zeros literal).
    for attribute in node.attribute:
        if attribute.name == "allowzero":
            attribute.i = 0


def _row_slice(name: str, axis: int, nodes: list, graph) -> str:
    """A Slice of row 0 of `axis` of `name`, appended to `nodes`; its output's name."""
    import onnx
    from onnx import numpy_helper

    out = f"{name}__rows0_axis{axis}"
    bounds = []
    for part, value in (("starts", 0), ("ends", 1), ("axes", axis)):
        bounds.append(f"{out}_{part}")
        graph.initializer.append(numpy_helper.from_array(np.array([value], dtype=np.int64), bounds[-1]))
    nodes.append(onnx.helper.make_node("Slice", [name, *bounds], [out], name=f"{out}_slice"))
    return out


def _attribute(node, name: str, default):
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default
