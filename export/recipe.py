"""The INT8 recipe: model.opt.onnx -> model.int8.onnx (+ calibration.json, quantization.json), step by step.

    plan = plan_int8(config, optimized_path, optimized_sha256, options, calibration_json)  # data read and checked
    details = write_int8(plan, scratch)                                                      # the graph, checked

1. plan: which weight ops go INT8 (quantize_rules; all of them when a search follows), the data sets
   and their fingerprints (the stage's key), the held-out rows of a search.
2. smooth: SmoothQuant factors for INT8 MatMul inputs from per-channel ranges (cached in calibration.json).
3. calibrate: activation ranges on the calibration set (cached when its key is unchanged).
4. probe: every node that may end up INT8, quantized once: what bias correction and the search measure.
5. bias correction: each INT8 node's mean error on calibration samples, subtracted from its bias.
6. search (with a target agreement): the fewest nodes kept in float that meet it on held-out rows.
7. write the QDQ graph, confirm what is INT8 in the file, check every scale, measure top-1 agreement
   with FP32 on the validation set, and write quantization.json.

Caching and publishing are the stage runner's job (miaotui/stages); this module only computes.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from miaotui.artifacts import atomic_write_json, sha256_json
from miaotui.config import Config, QuantizeSpec
from miaotui.errors import InputError
from miaotui.export import attention
from miaotui.workdir import CALIBRATION, GRAPHS, QUANTIZATION

INT8_NAME = GRAPHS["int8"]
# Bumped when the same inputs would give another model.int8.onnx (2: one-sided inputs shifted,
# weight tables under 30 dB kept float; 3: shifted inputs' ranges from their channel ranges; 4: bias
# correction, and the search's sensitivities count real tokens only; 5: lookups feeding a recurrent layer float;
# 6: outlier GELU channels split into copies, and the search starts from the rules' graph; 7: self-attention
# blocks and their Q, K, V ranges recorded in the graph's metadata).
QUANTIZE_RECIPE = "7"
SEARCH_SAMPLES = 384  # held-out calibration samples the search measures agreement on (time-bounded)
MIN_HELD_OUT = 32  # fewer held-out samples than this: the search measures on the ranges' own samples


@dataclass(frozen=True)
class QuantizeOptions:
    # The defaults are the config's [quantize] defaults; quantize_options() applies a config's own.
    method: str = QuantizeSpec.method  # minmax | entropy | percentile
    samples: int | None = QuantizeSpec.samples  # calibration samples to use (None: the whole set)
    smooth_alpha: float = QuantizeSpec.smooth_alpha  # SmoothQuant strength; 0 turns smoothing off
    include: tuple[str, ...] = ()  # node-name or op-type globs forced to INT8
    exclude: tuple[str, ...] = ()  # ... kept in float; wins over include
    calibration: str | None = None  # another calibration set than the config's [data] calibration
    # search for the fewest float nodes meeting this top-1 agreement on held-out calibration samples
    target_agreement: float | None = QuantizeSpec.target_top1_agreement
    bias_correction: bool = QuantizeSpec.bias_correction  # subtract each INT8 node's mean error from its bias

    def check(self) -> None:
        if self.samples is not None and self.samples < 1:
            raise InputError(f"--samples {self.samples}: expected a positive number of calibration samples")
        if self.target_agreement is not None and not 0 < self.target_agreement <= 1:
            raise InputError(f"--target-agreement {self.target_agreement}: expected a share above 0 up to 1")


def quantize_options(config: Config, method: str | None = None, samples: int | None = None,
                     include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                     calibration: str | None = None, smooth_alpha: float | None = None,
                     target_agreement: float | None = None, bias_correction: bool | None = None) -> QuantizeOptions:
    """The config's [quantize] table with the command line's choices on top."""
    base = config.quantize
    return QuantizeOptions(
        method=method or base.method,
        samples=samples if samples is not None else base.samples,
        smooth_alpha=smooth_alpha if smooth_alpha is not None else base.smooth_alpha,
        include=tuple(base.include) + tuple(include),
        exclude=tuple(base.exclude) + tuple(exclude),
        calibration=calibration,
        target_agreement=target_agreement if target_agreement is not None else base.target_top1_agreement,
        bias_correction=bias_correction if bias_correction is not None else base.bias_correction,
    )


@dataclass
class HeldOut:
    """Calibration samples the ranges were not computed from: the search's agreement set."""

    data: Any  # the DataSet
    start: int
    count: int
    fingerprint: str = ""

    @property
    def where(self) -> str:
        return f"{self.data.where} samples {self.start}..{self.start + self.count - 1}"

    def batches(self):
        """Feed dicts over rows [start, start + count) of the set."""
        offset = 0
        for feed in self.data.batches(self.start + self.count):
            rows = len(next(iter(feed.values())))
            begin, end = max(self.start - offset, 0), min(self.start + self.count - offset, rows)
            offset += rows
            if begin < end:
                yield {name: value[begin:end] for name, value in feed.items()}


def held_out_rows(calibration_set, used: int, warnings: list[str]) -> HeldOut:
    """Up to SEARCH_SAMPLES rows after the `used` ones, counted and fingerprinted in one pass."""
    from miaotui.data.datasets import summarize_batches

    summary = summarize_batches(HeldOut(calibration_set, used, SEARCH_SAMPLES).batches())
    if summary.samples >= MIN_HELD_OUT:
        return HeldOut(calibration_set, used, summary.samples, summary.fingerprint)
    warnings.append(f"{calibration_set.where}: only {used + summary.samples} samples, all used for the ranges: the "
                    "search measures agreement on them, which is not held out (give more calibration data)")
    summary = summarize_batches(HeldOut(calibration_set, 0, SEARCH_SAMPLES).batches())
    return HeldOut(calibration_set, 0, summary.samples, summary.fingerprint)


def agreement_set(config: Config, calibration_set, warnings: list[str], what: str):
    """The validation set, else `calibration_set` with a warning: what a stage compares with FP32 on."""
    from miaotui.data.datasets import data_set

    if config.data.validation:
        return data_set(config, "validation")
    warnings.append(f"{config.path}: no data.validation: {what} measured on the calibration set, which is not held out")
    return calibration_set


@dataclass
class DataPlan:
    """The data a quantization reads, checked and fingerprinted before anything runs."""

    options: QuantizeOptions
    calibration_set: Any
    calibration_data: Any  # DataSummary of the samples used for the ranges
    agreement_set: Any
    agreement_data: Any
    warnings: list[str] = field(default_factory=list)


def plan_data(config: Config, options: QuantizeOptions) -> DataPlan:
    """Every data batch read (and fingerprinted) first, so bad data fails before anything runs."""
    from miaotui.data.datasets import data_set, summarize
    from miaotui.export.calibration import check_sample_count

    options.check()
    calibration_set = data_set(config, "calibration", options.calibration)
    calibration_data = summarize(calibration_set, options.samples)
    warnings = check_sample_count(options.method, calibration_data.samples, calibration_set.where)
    if options.samples and calibration_data.samples < options.samples:
        warnings.append(f"{calibration_set.where}: {options.samples} samples asked for, the set has {calibration_data.samples}")
    agreement = agreement_set(config, calibration_set, warnings, "top-1 agreement")
    return DataPlan(options, calibration_set, calibration_data, agreement, summarize(agreement), warnings)


@dataclass
class Int8Plan:
    """Everything write_int8 needs, and the key inputs that make its output stale."""

    config: Config
    data: DataPlan
    optimized: Path  # model.opt.onnx
    optimized_sha256: str
    model: Any  # model.opt.onnx loaded, every node named (smoothing edits it in place)
    decisions: list
    calibration_key: Any  # CalibrationKey
    cached_calibration: Path  # the work dir's calibration.json, reused when its key matches
    external: bool  # weights in an external .data file
    held_out: HeldOut | None
    progress: bool = True
    channel_ranges: dict = field(default_factory=dict)  # per-channel input ranges for smoothing (step 2)

    @property
    def options(self) -> QuantizeOptions:
        return self.data.options

    @property
    def warnings(self) -> list[str]:
        return self.data.warnings

    def key_inputs(self) -> dict[str, str]:
        inputs = {GRAPHS["fp32"]: self.optimized_sha256, "recipe": QUANTIZE_RECIPE,
                  "calibration data": self.data.calibration_data.fingerprint,
                  "agreement data": self.data.agreement_data.fingerprint,
                  "calibration": sha256_json(asdict(self.calibration_key))}
        if self.held_out is not None:
            inputs["held-out data"] = self.held_out.fingerprint
        return inputs


def plan_int8(config: Config, data: DataPlan, optimized: Path, optimized_sha256: str, external: bool,
              cached_calibration: Path, progress: bool = True) -> Int8Plan:
    """Step 1: what goes INT8, and the calibration's key."""
    import onnx
    import onnxruntime

    from miaotui.export.calibration import METHOD_SETTINGS, CalibrationKey
    from miaotui.export.quantize import name_unnamed_nodes
    from miaotui.export.quantize_rules import plan_quantization

    options = data.options
    model = onnx.load(str(optimized))
    name_unnamed_nodes(model)
    decisions = plan_quantization(model, options.include, options.exclude, smoothing=bool(options.smooth_alpha))
    held_out = None
    if options.target_agreement is not None:
        from miaotui.export.search import from_rules

        decisions = from_rules(decisions)  # the search starts from the rules' graph
        held_out = held_out_rows(data.calibration_set, data.calibration_data.samples, data.warnings)
    key = CalibrationKey(optimized_sha256, data.calibration_data.fingerprint, data.calibration_data.samples,
                         options.method, sha256_json(METHOD_SETTINGS[options.method]), options.smooth_alpha,
                         onnxruntime.__version__)
    return Int8Plan(config, data, optimized, optimized_sha256, model, decisions, key, cached_calibration, external,
                    held_out, progress)


@dataclass
class _Smoothing:
    inputs: list  # SmoothedInput per smoothed MatMul input
    cached: Any  # the cached Calibration whose channel ranges were reused, or None


def _smooth(plan: Int8Plan) -> _Smoothing:
    """Step 2: SmoothQuant factors from per-channel ranges, applied to plan.model in place."""
    from miaotui.export.calibration import load_cached
    from miaotui.export.smoothing import channel_ranges, smooth, smoothing_targets

    options = plan.options
    cached = load_cached(plan.cached_calibration, plan.calibration_key)
    targets = smoothing_targets(plan.model, {d.name for d in plan.decisions if d.quantized}) if options.smooth_alpha else {}
    if cached and set(targets) <= set(cached.channel_ranges):
        ranges = {name: np.asarray(cached.channel_ranges[name], np.float32) for name in targets}
    else:
        cached = None  # new channel ranges: the ranges after smoothing are new too
        ranges = channel_ranges(plan.model, list(targets), plan.data.calibration_set.feeds(options.samples)) if targets else {}
    smoothed = smooth(plan.model, targets, ranges, options.smooth_alpha) if targets else []
    plan.channel_ranges = ranges
    return _Smoothing(smoothed, cached)


def _calibrate(plan: Int8Plan, smoothing: _Smoothing, calibrated: Path, scratch: Path, also: tuple[str, ...] = ()):
    """Step 3: activation ranges (reused from calibration.json when it covers the request); `also`:
    tensors to calibrate beyond what the QDQ graph quantizes (attention's Q, K and V)."""
    from miaotui.export.calibration import CalibrationRequest, calibrate, save
    from miaotui.export.quantize_rules import tensors_to_calibrate
    from miaotui.export.smoothing import shifted_ranges

    tensors = tuple(sorted(set(tensors_to_calibrate(plan.model, plan.decisions)) | set(also)))
    request = CalibrationRequest(plan.calibration_key, tensors)
    cached = smoothing.cached
    calibration = cached if cached and cached.covers(request) else None
    if calibration is None:
        calibration = calibrate(calibrated, plan.data.calibration_set.feeds(plan.options.samples), request, plan.progress)
        calibration.channel_ranges = {name: value.tolist() for name, value in plan.channel_ranges.items()}
        save(calibration, scratch / CALIBRATION)
    calibration.ranges.update(shifted_ranges(smoothing.inputs))
    return calibration


def _attention_blocks(plan: Int8Plan) -> list:
    """The self-attention blocks whose products the QDQ graph keeps in float (an --include can quantize
    them there: then the graph already decides)."""
    quantized = {d.name for d in plan.decisions if d.quantized}
    return [b for b in attention.find_blocks(plan.model)
            if b.scores_matmul not in quantized and b.context_matmul not in quantized]


def _record_attention(target: Path, blocks: list, external: bool) -> None:
    """The blocks and their ranges into the written graph's metadata, for the backends that run
    attention in INT8 (export/attention.py)."""
    import onnx

    from miaotui.export.quantize import save_model

    if not blocks:
        return
    model = onnx.load(str(target))
    attention.write_metadata(model, blocks)
    save_model(model, target, external)


def _bias_corrections(plan: Int8Plan, probe: Path) -> tuple[dict, float]:
    """Step 5: each INT8 node's mean error on calibration samples (seconds it took)."""
    import onnx

    from miaotui.data.datasets import rebatch, sample_rows
    from miaotui.export.bias_correction import BIAS_SAMPLES, measure_corrections

    started = time.perf_counter()
    rows = itertools.islice(sample_rows(plan.data.calibration_set.feeds(plan.options.samples)), BIAS_SAMPLES)
    corrections = measure_corrections(plan.model, onnx.load(str(probe)), rebatch(rows), plan.config.padding_mask)
    return corrections, time.perf_counter() - started


def write_int8(plan: Int8Plan, scratch: Path) -> dict[str, Any]:
    """Steps 2-7 into `scratch`: model.int8.onnx, quantization.json (and calibration.json when
    calibrated anew). Returns what the stage records and its summary shows."""
    import onnx

    from miaotui.export.bias_correction import BIAS_SAMPLES
    from miaotui.export.inspect_onnx import count_int8_nodes
    from miaotui.export.optimize import compare_onnx
    from miaotui.export.quantize import check_qdq, compare_top1, confirm_decisions, correct_biases, quantize_onnx
    from miaotui.export.smoothing import SMOOTHING_ATOL

    config, options, warnings = plan.config, plan.options, plan.warnings
    target = scratch / INT8_NAME
    smoothing = _smooth(plan)
    with tempfile.TemporaryDirectory(prefix="miaotui-smoothed-") as folder:
        calibrated = plan.optimized
        if smoothing.inputs:  # the calibrator reads a file; FP32 must still answer like model.opt.onnx
            calibrated = Path(folder) / "model.smoothed.onnx"
            onnx.save(plan.model, str(calibrated), save_as_external_data=plan.external, location=calibrated.name + ".data")
            compare_onnx(plan.optimized, calibrated, config, [config.sizes("opt")], atol=SMOOTHING_ATOL)
        blocks = _attention_blocks(plan)
        calibration = _calibrate(plan, smoothing, calibrated, scratch, attention.tensors_to_calibrate(blocks))
        chosen, search, corrections, probe, bias_seconds = plan.decisions, None, {}, None, 0.0
        if options.bias_correction or plan.held_out is not None:
            probe = Path(folder) / "probe.int8.onnx"  # step 4
            quantize_onnx(plan.model, probe, calibration, plan.decisions, plan.external)
        if options.bias_correction:
            corrections, bias_seconds = _bias_corrections(plan, probe)
        if plan.held_out is not None:  # step 6, inside: the search compares with the smoothed FP32 file
            from miaotui.export.search import search_float_nodes

            chosen, search = search_float_nodes(plan.model, calibrated, probe, calibration, plan.decisions,
                                                plan.held_out, options.target_agreement, config.model.outputs[0],
                                                plan.external, plan.progress, config.padding_mask, corrections)
            if not search.met:
                warnings.append(f"--target-agreement {options.target_agreement:g}: not met on {search.held_out} "
                                f"even with every searchable node in float (best {search.agreement:.4f})")
        if probe is not None and [d.quantized for d in chosen] == [d.quantized for d in plan.decisions]:
            corrected = correct_biases(probe, target, corrections, plan.external)  # the probe is the graph
        else:
            corrected = quantize_onnx(plan.model, target, calibration, chosen, plan.external, corrections)
        attention_blocks = attention.ranged(blocks, calibration.ranges)
        _record_attention(target, attention_blocks, plan.external)
    final = confirm_decisions(target, chosen)  # step 7
    check = check_qdq(target, plan.model, calibration)
    agreement = compare_top1(plan.optimized, target, plan.data.agreement_set.batches(), config.model.outputs[0],
                             plan.progress, reference_key=(plan.optimized_sha256, plan.data.agreement_data.fingerprint))
    bar = config.validate.get("int8", {}).get("min_top1_agreement")
    if bar is not None and agreement.top1_agreement < bar:
        warnings.append(f"top-1 agreement {agreement.top1_agreement:.4f} is below [validate.int8] "
                        f"min_top1_agreement {bar:g}: the parity gate will fail; quantization.json says what is "
                        "INT8 (try another --method or --exclude the nodes that drift)")
    smoothed = smoothing.inputs
    details = {
        "method": options.method,
        "calibration": {"samples": calibration.key.samples, "seconds": round(calibration.seconds, 3),
                        "cached": calibration.cached, "set": plan.data.calibration_set.where},
        # What inspect counts (export/inspect_onnx.py): compute nodes of the written graph that run in INT8.
        "nodes": dict(zip(("quantized", "float"), count_int8_nodes(onnx.load(str(target), load_external_data=False)))),
        # The rules' (or the search's) decisions over the ops that take INT8 weights.
        "ops": {"quantized": sum(d.quantized for d in final), "float": sum(not d.quantized for d in final)},
        "smoothing": {"alpha": options.smooth_alpha, "inputs": len(smoothed), "shifted": sum(i.shifted for i in smoothed),
                      "max_factor": round(max((i.max_factor for i in smoothed), default=1.0), 3)},
        "bias_correction": {"nodes": len(corrected), "samples": min(BIAS_SAMPLES, plan.data.calibration_data.samples)
                            if corrected else 0,
                            "max_rms": round(max((c.rms for c in corrected), default=0.0), 6),
                            "seconds": round(bias_seconds, 3)},
        "qdq_check": asdict(check),
        # Self-attention blocks whose Q, K and V ranges model.int8.onnx's metadata records (export/attention.py).
        "attention": {"blocks": len(attention_blocks)},
        "agreement": asdict(agreement) | {"set": plan.data.agreement_set.where},
        "warnings": warnings,
    }
    if search is not None:
        details["search"] = {"target": search.target, "met": search.met, "agreement": search.agreement,
                             "held_out": search.held_out, "samples": search.samples, "kept_float": search.kept_float,
                             "steps": len(search.steps), "seconds": search.seconds,
                             "int8_macs_share": search.int8_macs_share}
    atomic_write_json(scratch / QUANTIZATION, _report(details, options, smoothed, corrected, search, final))
    return details


def _report(details: dict, options: QuantizeOptions, smoothed, corrected, search, final) -> dict:
    """quantization.json: the summary plus every decision and why."""
    from miaotui.export.quantize_rules import REASONS

    return details | {
        "op_types_quantized": sorted({d.op_type for d in final if d.quantized}),
        "include": list(options.include),
        "exclude": list(options.exclude),
        "smoothed_inputs": [asdict(i) for i in smoothed],
        "bias_corrections": [asdict(c) for c in corrected],
        "search": asdict(search) if search is not None else None,
        "decisions": [{"node": d.name, "op_type": d.op_type, "quantized": d.quantized, "reason": d.reason,
                       "why": d.explain()} for d in final],
        "reasons": REASONS,
    }
