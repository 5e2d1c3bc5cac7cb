"""model.opt.onnx + calibrated ranges + decisions -> model.int8.onnx, in QDQ form for TensorRT and ONNX
Runtime; then the file is checked against the ranges and weights, and against FP32 on real data.

The QDQ graph is written by ONNX Runtime's quantize_static from the cached ranges (its calibration
cache, so it never calibrates a second time): symmetric INT8 (zero point 0) for activations per
tensor and weights per output channel; biases stay float (TensorRT's parser rejects the INT32 biases
quantize_static writes by default).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from miaotui.errors import CheckFailed, InputError
from miaotui.export.bias_correction import BiasCorrection, apply_corrections
from miaotui.export.calibration import Calibration, onnxruntime_cache, onnxruntime_method, quiet_onnxruntime
from miaotui.export.quantize_rules import NodeDecision
from miaotui.export.smoothing import COMPENSATION_SUFFIX, compensate_shifts

INT8_MAX = 127  # symmetric INT8: [-127, 127], scale = |range| / 127
SCALE_RTOL = 1e-5
SAME_SCALE_OP_TYPES = ("Gather", "GatherElements", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
                       "Slice", "Split", "Pad", "MaxPool", "Resize", "TopK", "Concat", "Where")


def name_unnamed_nodes(model) -> int:
    """Give every nameless node a unique name: decisions and --exclude refer to nodes by name."""
    taken = {node.name for node in model.graph.node if node.name}
    named = 0
    for index, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{index}"
            while candidate in taken:
                candidate += "_"
            node.name = candidate
            taken.add(candidate)
            named += 1
    return named


def quantize_onnx(model, destination: Path, calibration: Calibration, decisions: list[NodeDecision],
                  external_data: bool = False, corrections: dict[str, np.ndarray] | None = None) -> list[BiasCorrection]:
    """Write the QDQ model for the nodes `decisions` marks quantized, with the calibrated ranges;
    `corrections` (measure_corrections) are subtracted from the biases of the nodes written INT8."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    nodes = [d.name for d in decisions if d.quantized]
    if not nodes:
        raise InputError("nothing to quantize: every candidate node is kept in float (check --exclude)")
    op_types = sorted({d.op_type for d in decisions if d.quantized})
    with tempfile.TemporaryDirectory(prefix="miaotui-quantize-") as scratch, quiet_onnxruntime():
        cache = Path(scratch) / "ranges.json"
        onnxruntime_cache(calibration, cache)
        quantize_static(
            model,
            str(destination),
            calibration_data_reader=None,
            calibration_cache_path=str(cache),
            calibrate_method=onnxruntime_method(calibration.key.method),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            nodes_to_quantize=nodes,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=external_data,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                # Outputs stay float: the next op (a residual Add, a LayerNorm, the logits) takes float,
                # and an extra Q/DQ there only adds rounding. A Gather's output keeps its table's
                # scale (INT8 storage), which needs no range of its own.
                "OpTypesToExcludeOutputQuantization": [t for t in op_types if t != "Gather"],
            },
        )
    applied: list[BiasCorrection] = []
    if corrections or any(node.name.endswith(COMPENSATION_SUFFIX) for node in model.graph.node):
        import onnx

        written = onnx.load(str(destination))
        compensated = compensate_shifts(written)  # first: a corrected compensation must not be recomputed
        applied = apply_corrections(written, corrections or {})
        if compensated or applied:
            save_model(written, destination, external_data)
    return applied


def correct_biases(source: Path, destination: Path, corrections: dict[str, np.ndarray],
                   external_data: bool = False) -> list[BiasCorrection]:
    """`source` (a file quantize_onnx wrote, uncorrected) with `corrections` applied, as `destination`:
    what quantize_onnx(..., corrections) would write for the same decisions, without quantizing again."""
    import onnx

    written = onnx.load(str(source))
    applied = apply_corrections(written, corrections)
    save_model(written, destination, external_data)
    return applied


def save_model(model, destination: Path, external_data: bool) -> None:
    import onnx

    # onnx appends external tensors to an existing file: start it afresh
    destination.with_name(destination.name + ".data").unlink(missing_ok=True)
    onnx.save(model, str(destination), save_as_external_data=external_data,
              location=destination.name + ".data" if external_data else None)


def confirm_decisions(int8_path: Path, decisions: list[NodeDecision]) -> list[NodeDecision]:
    """The decisions as the written file has them: a node planned INT8 that ONNX Runtime's quantizer
    left without a DequantizeLinear input (a data-movement op whose input is float) is float."""
    import dataclasses

    import onnx

    model = onnx.load(str(int8_path), load_external_data=False)
    dequantized = {output for node in model.graph.node if node.op_type == "DequantizeLinear" for output in node.output}
    fed = {node.name for node in model.graph.node if any(name in dequantized for name in node.input)}
    return [d if not d.quantized or d.name in fed else dataclasses.replace(d, quantized=False, reason="quantizer-skipped")
            for d in decisions]


@dataclass
class QdqCheck:
    activations: int  # QuantizeLinear nodes whose scale matched the calibrated range
    weights: int  # weight tensors whose INT8 values and scales reproduce the float weights
    float_biases: int


def check_qdq(int8_path: Path, float_model, calibration: Calibration) -> QdqCheck:
    """Every scale in the QDQ file must follow from the calibrated ranges and the float weights.

    Zero points are all 0 (symmetric); an activation's scale is max(|lo|, |hi|) / 127 of its
    calibrated range; a weight's INT8 values times its per-channel scales give back the float
    weights within half a step, with each channel's largest value at +-127. A quantizer bug
    (a wrong range, axis or rounding) fails here, before any accuracy is measured.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(int8_path))
    initializers = {init.name: init for init in model.graph.initializer}
    floats = {init.name: init for init in float_model.graph.initializer}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(initializers[name])

    producers = {output: node for node in model.graph.node for output in node.output}

    def input_scale(tensor: str) -> np.ndarray | None:
        # Data-movement ops (a Gather from an INT8 table, a Reshape...) pass INT8 through: the Q on
        # their output reuses the scale of the DQ on their input instead of a range of its own.
        producer = producers.get(tensor)
        if producer is None or producer.op_type not in SAME_SCALE_OP_TYPES:
            return None
        dequantize = producers.get(producer.input[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            return None
        return array(dequantize.input[1]).astype(np.float64)

    activations = weights = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = array(node.input[1]).astype(np.float64)
        zero_point = array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero_point is None or zero_point.dtype != np.int8 or np.any(zero_point != 0):
            raise CheckFailed(f"{int8_path.name}: {node.name}: zero point must be INT8 0 (symmetric), "
                              f"got {None if zero_point is None else zero_point.dtype}")
        source = node.input[0]
        if node.op_type == "QuantizeLinear":
            inherited = input_scale(source)
            if inherited is not None:
                expected, origin = inherited, "the scale of its input"
            elif source in producers and producers[source].op_type == "Softmax" and \
                    getattr(producers.get(producers[source].input[0]), "op_type", None) == "DequantizeLinear":
                # ONNX Runtime's quantizer pins an INT8 softmax's range to [0, 1] whatever was seen.
                expected, origin = 1.0 / INT8_MAX, "a softmax's range [0, 1]"
            elif source in calibration.ranges:
                low, high = calibration.ranges[source]
                expected, origin = max(abs(low), abs(high)) / INT8_MAX, f"its calibrated range [{low:.6g}, {high:.6g}]"
            else:
                raise CheckFailed(f"{int8_path.name}: {node.name} quantizes {source!r}, which has no calibrated range")
            if scale.shape != np.shape(expected) or not np.allclose(scale, expected, rtol=SCALE_RTOL, atol=0):
                raise CheckFailed(f"{int8_path.name}: {node.name}: scale {float(scale.ravel()[0]):.6g} for {source!r} "
                                  f"does not follow from {origin} (expected {float(np.ravel(expected)[0]):.6g})")
            activations += 1
        elif source in initializers:
            original = source.removesuffix("_quantized")
            if original not in floats:
                continue
            _check_weight(int8_path.name, original, numpy_helper.to_array(floats[original]).astype(np.float64),
                          array(source), scale, _axis(node))
            weights += 1
    biases = sum(1 for node in model.graph.node if node.op_type in ("Gemm", "Conv") and len(node.input) > 2
                 and node.input[2] in initializers and initializers[node.input[2]].data_type == onnx.TensorProto.FLOAT)
    return QdqCheck(activations, weights, biases)


def _axis(node) -> int:
    for attribute in node.attribute:
        if attribute.name == "axis":
            return attribute.i
    return 1


def _check_weight(file: str, name: str, weight: np.ndarray, quantized: np.ndarray, scale: np.ndarray, axis: int) -> None:
    if quantized.dtype != np.int8 or quantized.shape != weight.shape:
        raise CheckFailed(f"{file}: weight {name!r}: expected INT8 of shape {list(weight.shape)}, "
                          f"got {quantized.dtype} {list(quantized.shape)}")
    if scale.ndim:  # per channel along `axis`
        axis = axis % weight.ndim
        shape = [1] * weight.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        others = tuple(i for i in range(weight.ndim) if i != axis)
        peak = np.abs(weight).max(axis=others, keepdims=True)
    else:
        peak = np.abs(weight).max()
    expected = peak / INT8_MAX
    # A channel of zeros gets a tiny positive scale from the quantizer; its values are 0 either way.
    live = np.broadcast_to(peak > 0, np.shape(expected))
    if not np.allclose(np.broadcast_to(scale, np.shape(expected))[live], expected[live], rtol=SCALE_RTOL, atol=0):
        raise CheckFailed(f"{file}: weight {name!r}: per-channel scales do not equal max|w| / 127")
    error = np.abs(quantized.astype(np.float64) * scale - weight)
    if np.any(error > 0.5 * scale * (1 + 1e-4) + 1e-12):
        raise CheckFailed(f"{file}: weight {name!r}: INT8 values x scales miss the float weights by more than half a step")


@dataclass
class Agreement:
    samples: int
    top1_agreement: float  # share of samples where INT8's top label equals FP32's
    reference_accuracy: float | None  # against the set's labels, when it has them
    candidate_accuracy: float | None

    @property
    def accuracy_drop(self) -> float | None:
        if self.reference_accuracy is None or self.candidate_accuracy is None:
            return None
        return self.reference_accuracy - self.candidate_accuracy

    @classmethod
    def from_details(cls, data: dict) -> "Agreement":
        """From what a stage recorded (asdict plus the set's name)."""
        return cls(data["samples"], data["top1_agreement"], data.get("reference_accuracy"), data.get("candidate_accuracy"))

    def text(self) -> str:
        text = f"top-1 agreement with FP32 {self.top1_agreement:.4f} on {self.samples}"
        if self.reference_accuracy is not None:
            text += f"; accuracy {self.reference_accuracy:.4f} -> {self.candidate_accuracy:.4f}"
        return text


# FP32 top-1 answers on an agreement set, by (reference file sha256, data fingerprint, output): the
# quantize and FP16 stages of one process (`miaotui run`, a test module) compare against the same
# FP32 graph on the same set, and its pass is as long as the candidate's.
_REFERENCE_TOP1: dict[tuple[str, str, str], list[np.ndarray]] = {}


def compare_top1(reference: Path, candidate: Path, batches: Iterable[dict[str, np.ndarray]], output: str,
                 progress: bool = True, threads: int = 0, label: str = "INT8 vs FP32",
                 reference_key: tuple[str, str] | None = None) -> Agreement:
    """Top-1 agreement (and accuracy, with labels) of two ONNX files run by ONNX Runtime on the CPU.
    `reference_key` (the reference's sha256, the data's fingerprint) lets a later call reuse the
    reference's answers instead of running it again."""
    from tqdm import tqdm

    from miaotui.data.datasets import LABELS, without_labels
    from miaotui.export.parity import onnxruntime_session, run_session

    key = (*reference_key, output) if reference_key else None
    known = _REFERENCE_TOP1.get(key) if key else None
    answers: list[np.ndarray] = []
    reference_session = None if known is not None else onnxruntime_session(reference, threads)
    candidate_session = onnxruntime_session(candidate, threads)
    total = agree = right_reference = right_candidate = 0
    labelled = True
    with tqdm(desc=label, unit="sample", disable=not progress, leave=False) as bar:
        for index, feed in enumerate(batches):
            inputs = without_labels(feed)
            if known is not None:
                if index >= len(known) or len(known[index]) != len(next(iter(inputs.values()))):
                    raise InputError("the agreement set changed under the same fingerprint")
                expected = known[index]
            else:
                expected = run_session(reference_session, inputs)[output].argmax(axis=-1)
            answers.append(expected)
            top = [expected, run_session(candidate_session, inputs)[output].argmax(axis=-1)]
            agree += int((top[0] == top[1]).sum())
            total += len(top[0])
            if LABELS in feed and labelled:
                right_reference += int((top[0] == feed[LABELS]).sum())
                right_candidate += int((top[1] == feed[LABELS]).sum())
            else:
                labelled = False
            bar.update(len(top[0]))
    if total == 0:
        raise InputError("the agreement set is empty")
    if key and known is None:
        _REFERENCE_TOP1[key] = answers
    return Agreement(total, agree / total, right_reference / total if labelled else None,
                     right_candidate / total if labelled else None)
