"""model.onnx -> model.opt.onnx: constant folding, shape inference, dead-node cleanup.

Done with Polygraphy's loaders (onnx-graphsurgeon folding, ONNX Runtime for what it cannot fold,
onnx shape inference). Measured against onnxslim on both built-in models: the same node counts
(lstm 46 -> 30, minilm 202 -> 202, since torch.onnx's own optimizer already folded it) and the same
ONNX Runtime latency, so the project stays with Polygraphy, already a dependency. The output is
plain ONNX (no ONNX Runtime contrib ops: ORT's fusions happen later, in the onnxruntime engine) and
must answer like model.onnx within 1e-5.

Then, where the classifier pools its first token, the last layer is narrowed to that row
(export/pooled_rows.py): exact, and about 14% of a six-layer BERT-style encoder's matrix work at
sequence 128 gone.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from miaotui.config import Config
from miaotui.errors import CheckFailed, MiaotuiError

OPTIMIZE_ATOL = 1e-5


@dataclass
class OptimizeReport:
    nodes_before: int
    nodes_after: int
    removed_ops: dict[str, int] = field(default_factory=dict)  # op type -> how many fewer
    max_abs_diff: float = 0.0  # model.opt.onnx against model.onnx on sample inputs
    pooled_row_nodes: int = 0  # nodes narrowed to the pooled token's row (export/pooled_rows.py)


def optimize_onnx(source: Path, destination: Path, external_data_threshold: int) -> OptimizeReport:
    import onnx
    from polygraphy.backend.onnx import fold_constants, infer_shapes
    from polygraphy.logger import G_LOGGER

    from miaotui.export.pooled_rows import narrow_to_pooled_rows

    model = onnx.load(str(source))
    before = collections.Counter(node.op_type for node in model.graph.node)
    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            optimized = infer_shapes(fold_constants(model, num_passes=None, fold_shapes=True), error_ok=False)
            narrowed = narrow_to_pooled_rows(optimized)
            if narrowed.narrowed_nodes:
                optimized = infer_shapes(optimized, error_ok=False)
    except Exception as error:
        raise MiaotuiError(f"{source}: graph optimization failed: {str(error).strip().splitlines()[0]}") from error
    after = collections.Counter(node.op_type for node in optimized.graph.node)
    large = optimized.ByteSize() > external_data_threshold
    onnx.save(optimized, str(destination), save_as_external_data=large, location=destination.name + ".data")
    onnx.checker.check_model(str(destination), full_check=True)
    removed = {op: before[op] - after.get(op, 0) for op in before if before[op] > after.get(op, 0)}
    return OptimizeReport(sum(before.values()), sum(after.values()), removed, pooled_row_nodes=narrowed.narrowed_nodes)


def compare_onnx(reference: Path, candidate: Path, config: Config, sizes_list: list[dict[str, int]],
                 atol: float = OPTIMIZE_ATOL) -> float:
    """Max |difference| of two ONNX files on the same sample inputs; CheckFailed past `atol`."""
    from miaotui.data.samples import sample_inputs
    from miaotui.export.parity import max_abs_diff, onnxruntime_session, run_session

    sessions = onnxruntime_session(reference), onnxruntime_session(candidate)
    worst = 0.0
    for index, sizes in enumerate(sizes_list):
        feed = sample_inputs(config, sizes, seed=index)
        expected, actual = (run_session(s, feed) for s in sessions)
        for name in config.model.outputs:
            diff = max_abs_diff(np.asarray(expected[name]), np.asarray(actual[name]), name)
            worst = max(worst, diff)
            if diff > atol:
                raise CheckFailed(f"{candidate.name} differs from {reference.name}: output {name} max |diff| {diff:.3g} > {atol:g}")
    return worst
