"""The export, optimize and quantize stages in a work directory: skipped when their inputs are unchanged
(per manifest.json), written atomically otherwise."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from miaotui.artifacts import StageResult, WorkDir, atomic_write_json, run_stage, sha256_file, sha256_json
from miaotui.config import Config, QuantizeSpec
from miaotui.errors import CheckFailed, InputError
from miaotui.export.optimize import OPTIMIZE_ATOL, compare_onnx, optimize_onnx
from miaotui.export.parity import FLOAT32_ATOL, ParityResult, check_parity, parity_sizes
from miaotui.export.torch_to_onnx import PROTOBUF_LIMIT, ExportOptions, export_to_onnx

ONNX_NAME = "model.onnx"
OPT_NAME = "model.opt.onnx"


@dataclass
class ExportResult(StageResult):
    @property
    def onnx_path(self) -> Path:
        return self.path

    @property
    def parity(self) -> list[ParityResult]:
        return [ParityResult(**p) for p in self.details.get("parity", [])]


def tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import polygraphy
    import torch

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "polygraphy": polygraphy.__version__,
    }


def _graph_view(config: Config) -> dict:
    # Only what shapes the graph; [data] or [validate] edits must not force a re-export.
    view = config.to_dict()
    return {k: view[k] for k in ("model", "inputs", "dims", "export")}


def export_inputs(config: Config) -> dict[str, str]:
    """The files (and resolved config) whose change makes the export stale."""
    from miaotui.models.loading import factory_sources

    inputs = {"config": sha256_json(_graph_view(config))}
    sources = factory_sources(config.model.factory)
    if sources:
        inputs["factory"] = sha256_json({str(p): sha256_file(p) for p in sources})
    if config.model.checkpoint:
        inputs["checkpoint"] = sha256_file(config.model.checkpoint)
    return inputs


def write_resolved_config(config: Config, work: WorkDir) -> None:
    import tomli_w

    from miaotui.artifacts import atomic_write_bytes

    data = tomli_w.dumps(config.to_dict()).encode()
    target = work.path("config.toml")
    if not target.is_file() or target.read_bytes() != data:
        atomic_write_bytes(target, data)


def run_export_stage(config: Config, work_dir: str | Path, options: ExportOptions | None = None,
                     force: bool = False, model=None) -> ExportResult:
    """Export the config's model into `work_dir`/model.onnx unless the manifest says it is current.

    A bad factory or checkpoint fails inside the staging area, which is removed together with the
    work dir when this run created it: a mistake leaves nothing behind.
    """
    from miaotui.models.loading import load_model

    options = options or ExportOptions(opset=config.export.opset)
    work = WorkDir(work_dir)

    def produce(scratch: Path) -> dict[str, Any]:
        nonlocal model
        model = model if model is not None else load_model(config)
        staged = export_to_onnx(model, config, scratch / ONNX_NAME, options)
        parity = check_parity(model, config, staged, parity_sizes(config))
        write_resolved_config(config, work)
        return {"parity": [asdict(p) for p in parity]}

    return run_stage(work, tool_versions(), "export", ONNX_NAME, export_inputs(config), asdict(options) | {"atol": FLOAT32_ATOL},
                      produce, force, ExportResult)


def run_optimize_stage(config: Config, work_dir: str | Path, force: bool = False,
                       external_data_threshold: int | None = None, export: ExportResult | None = None) -> StageResult:
    """model.onnx -> model.opt.onnx, running the export stage first unless `export` is its result.
    `force` redoes this stage only; the export is redone only when stale."""
    export = export or run_export_stage(config, work_dir)
    work = WorkDir(work_dir)
    threshold = external_data_threshold or PROTOBUF_LIMIT
    # The export's record holds the sha256s of model.onnx (and its .data), just verified or written.
    inputs = {"config": sha256_json(_graph_view(config))} | work.record("export").outputs

    def produce(scratch: Path) -> dict[str, Any]:
        report = optimize_onnx(export.path, scratch / OPT_NAME, threshold)
        report.max_abs_diff = compare_onnx(export.path, scratch / OPT_NAME, config, parity_sizes(config))
        return asdict(report)

    return run_stage(work, tool_versions(), "optimize", OPT_NAME, inputs, {"atol": OPTIMIZE_ATOL, "external_data_threshold": threshold},
                      produce, force)


INT8_NAME = "model.int8.onnx"
QUANTIZATION_NAME = "quantization.json"


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


@dataclass
class QuantizeResult(StageResult):
    warnings: list[str] = field(default_factory=list)
    earlier: list[StageResult] = field(default_factory=list)  # the export and optimize runs it made first


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


def run_quantize_stage(config: Config, work_dir: str | Path, options: QuantizeOptions | None = None,
                       force: bool = False, progress: bool = True, optimize: StageResult | None = None) -> QuantizeResult:
    """model.opt.onnx -> model.int8.onnx (+ calibration.json, quantization.json), after optimize.

    Every data batch is checked (and fingerprinted) before anything runs, so bad data fails first
    and leaves nothing behind; calibration is skipped when calibration.json holds the same key.
    """
    import itertools
    import time

    import onnx
    import onnxruntime

    from miaotui.data.datasets import data_set, rebatch, sample_rows, summarize
    from miaotui.export.bias_correction import BIAS_SAMPLES, measure_corrections
    from miaotui.export.calibration import (CALIBRATION_NAME, METHOD_SETTINGS, CalibrationKey, CalibrationRequest,
                                            calibrate, check_sample_count, load_cached, save)
    from miaotui.export.smoothing import SMOOTHING_ATOL, channel_ranges, shifted_ranges, smooth, smoothing_targets
    from miaotui.export.quantize import (check_qdq, compare_top1, confirm_decisions, correct_biases, name_unnamed_nodes,
                                         quantize_onnx)
    from miaotui.export.quantize_rules import REASONS, plan_quantization, tensors_to_calibrate

    options = options or quantize_options(config)
    if options.samples is not None and options.samples < 1:
        raise InputError(f"--samples {options.samples}: expected a positive number of calibration samples")
    if options.target_agreement is not None and not 0 < options.target_agreement <= 1:
        raise InputError(f"--target-agreement {options.target_agreement}: expected a share above 0 up to 1")
    calibration_set = data_set(config, "calibration", options.calibration)
    calibration_data = summarize(calibration_set, options.samples)
    warnings = check_sample_count(options.method, calibration_data.samples, calibration_set.where)
    if options.samples and calibration_data.samples < options.samples:
        warnings.append(f"{calibration_set.where}: {options.samples} samples asked for, the set has {calibration_data.samples}")
    agreement_set = _agreement_set(config, calibration_set, warnings, "top-1 agreement")
    agreement_data = summarize(agreement_set)

    earlier = []
    if optimize is None:
        exported = run_export_stage(config, work_dir)
        optimize = run_optimize_stage(config, work_dir, export=exported)
        earlier = [exported, optimize]
    work = WorkDir(work_dir)
    model = onnx.load(str(optimize.path))
    name_unnamed_nodes(model)
    decisions = plan_quantization(model, options.include, options.exclude, smoothing=bool(options.smooth_alpha))
    mask_input = config.padding_mask
    held_out = None
    if options.target_agreement is not None:
        from miaotui.export.search import all_int8

        decisions = all_int8(decisions)  # the search starts from every weight op in INT8
        held_out = _held_out(calibration_set, calibration_data.samples, warnings)
    opt_record = work.record("optimize")
    key = CalibrationKey(opt_record.outputs[OPT_NAME], calibration_data.fingerprint, calibration_data.samples,
                         options.method, sha256_json(METHOD_SETTINGS[options.method]), options.smooth_alpha,
                         onnxruntime.__version__)
    inputs = {"model.opt.onnx": opt_record.outputs[OPT_NAME], "recipe": QUANTIZE_RECIPE,
              "calibration data": calibration_data.fingerprint,
              "agreement data": agreement_data.fingerprint, "calibration": sha256_json(asdict(key))}
    external = any(name.endswith(".data") for name in opt_record.outputs)

    def produce(scratch: Path) -> dict[str, Any]:
        cached = load_cached(work.path(CALIBRATION_NAME), key)
        targets = smoothing_targets(model, {d.name for d in decisions if d.quantized}) if options.smooth_alpha else {}
        if cached and set(targets) <= set(cached.channel_ranges):
            ranges = {name: np.asarray(cached.channel_ranges[name], np.float32) for name in targets}
        else:
            cached = None  # new channel ranges: the ranges after smoothing are new too
            ranges = channel_ranges(model, list(targets), calibration_set.batches(options.samples)) if targets else {}
        smoothed = smooth(model, targets, ranges, options.smooth_alpha) if targets else []
        with tempfile.TemporaryDirectory(prefix="miaotui-smoothed-") as folder:
            calibrated = optimize.path
            if smoothed:  # the calibrator reads a file; FP32 must still answer like model.opt.onnx
                calibrated = Path(folder) / "model.smoothed.onnx"
                onnx.save(model, str(calibrated), save_as_external_data=external, location=calibrated.name + ".data")
                compare_onnx(optimize.path, calibrated, config, [config.sizes("opt")], atol=SMOOTHING_ATOL)
            request = CalibrationRequest(key, tensors_to_calibrate(model, decisions))
            calibration = cached if cached and cached.covers(request) else None
            if calibration is None:
                calibration = calibrate(calibrated, calibration_set.batches(options.samples), request, progress)
                calibration.channel_ranges = {name: value.tolist() for name, value in ranges.items()}
                save(calibration, scratch / CALIBRATION_NAME)
            calibration.ranges.update(shifted_ranges(smoothed))
            chosen, search, corrections, probe = decisions, None, {}, None
            if options.bias_correction or held_out is not None:
                # every node that may end up INT8, quantized once: what bias correction and the search measure
                probe = Path(folder) / "probe.int8.onnx"
                quantize_onnx(model, probe, calibration, decisions, external)
            bias_seconds = 0.0
            if options.bias_correction:
                started = time.perf_counter()
                rows = itertools.islice(sample_rows(calibration_set.batches(options.samples)), BIAS_SAMPLES)
                corrections = measure_corrections(model, onnx.load(str(probe)), rebatch(rows), mask_input)
                bias_seconds = time.perf_counter() - started
            if held_out is not None:  # inside: the search compares with the smoothed FP32 file
                from miaotui.export.search import search_float_nodes

                chosen, search = search_float_nodes(model, calibrated, probe, calibration, decisions, held_out,
                                                    options.target_agreement, config.model.outputs[0], external,
                                                    progress, mask_input, corrections)
                if not search.met:
                    warnings.append(f"--target-agreement {options.target_agreement:g}: not met on {search.held_out} "
                                    f"even with every searchable node in float (best {search.agreement:.4f})")
            if probe is not None and [d.quantized for d in chosen] == [d.quantized for d in decisions]:
                corrected = correct_biases(probe, scratch / INT8_NAME, corrections, external)  # the probe is the graph
            else:
                corrected = quantize_onnx(model, scratch / INT8_NAME, calibration, chosen, external, corrections)
        final = confirm_decisions(scratch / INT8_NAME, chosen)
        check = check_qdq(scratch / INT8_NAME, model, calibration)
        agreement = compare_top1(optimize.path, scratch / INT8_NAME, agreement_set.batches(), config.model.outputs[0],
                                 progress, reference_key=(opt_record.outputs[OPT_NAME], agreement_data.fingerprint))
        bar = config.validate.get("int8", {}).get("min_top1_agreement")
        if bar is not None and agreement.top1_agreement < bar:
            warnings.append(f"top-1 agreement {agreement.top1_agreement:.4f} is below [validate.int8] "
                            f"min_top1_agreement {bar:g}: the parity gate will fail; quantization.json says what is "
                            "INT8 (try another --method or --exclude the nodes that drift)")
        details = {
            "method": options.method,
            "calibration": {"samples": calibration.key.samples, "seconds": round(calibration.seconds, 3),
                            "cached": calibration.cached, "set": calibration_set.where},
            "nodes": {"quantized": sum(d.quantized for d in final), "float": sum(not d.quantized for d in final)},
            "smoothing": {"alpha": options.smooth_alpha, "inputs": len(smoothed), "shifted": sum(i.shifted for i in smoothed),
                          "max_factor": round(max((i.max_factor for i in smoothed), default=1.0), 3)},
            "bias_correction": {"nodes": len(corrected), "samples": min(BIAS_SAMPLES, calibration_data.samples)
                                if corrected else 0,
                                "max_rms": round(max((c.rms for c in corrected), default=0.0), 6),
                                "seconds": round(bias_seconds, 3)},
            "qdq_check": asdict(check),
            "agreement": asdict(agreement) | {"set": agreement_set.where},
            "warnings": warnings,
        }
        if search is not None:
            details["search"] = {"target": search.target, "met": search.met, "agreement": search.agreement,
                                 "held_out": search.held_out, "samples": search.samples, "kept_float": search.kept_float,
                                 "steps": len(search.steps), "seconds": search.seconds}
        report = details | {
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
        atomic_write_json(scratch / QUANTIZATION_NAME, report)
        return details

    if held_out is not None:
        inputs["held-out data"] = held_out.fingerprint
    result = run_stage(work, tool_versions(), "quantize", INT8_NAME, inputs, asdict(options), produce, force, QuantizeResult)
    result.warnings = list(result.details.get("warnings", []))
    result.earlier = earlier
    return result


# Bumped when the same inputs would give another model.int8.onnx (2: one-sided inputs shifted,
# weight tables under 30 dB kept float; 3: shifted inputs' ranges from their channel ranges; 4: bias
# correction, and the search's sensitivities count real tokens only).
QUANTIZE_RECIPE = "4"
SEARCH_SAMPLES = 384  # held-out calibration samples the search measures agreement on (time-bounded)
MIN_HELD_OUT = 32  # fewer held-out samples than this: the search measures on the ranges' own samples


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


def _held_out(calibration_set, used: int, warnings: list[str]) -> HeldOut:
    """Up to SEARCH_SAMPLES rows after the `used` ones, counted and fingerprinted in one pass."""
    from miaotui.data.datasets import summarize_batches

    summary = summarize_batches(HeldOut(calibration_set, used, SEARCH_SAMPLES).batches())
    if summary.samples >= MIN_HELD_OUT:
        return HeldOut(calibration_set, used, summary.samples, summary.fingerprint)
    warnings.append(f"{calibration_set.where}: only {used + summary.samples} samples, all used for the ranges: the "
                    "search measures agreement on them, which is not held out (give more calibration data)")
    summary = summarize_batches(HeldOut(calibration_set, 0, SEARCH_SAMPLES).batches())
    return HeldOut(calibration_set, 0, summary.samples, summary.fingerprint)


def _agreement_set(config: Config, calibration_set, warnings: list[str], what: str):
    """The validation set, else `calibration_set` with a warning: what a stage compares with FP32 on."""
    from miaotui.data.datasets import data_set

    if config.data.validation:
        return data_set(config, "validation")
    warnings.append(f"{config.path}: no data.validation: {what} measured on the calibration set, which is not held out")
    return calibration_set


def stages_before(config: Config, work_dir: str | Path, earlier: list[StageResult] | None, quantized: bool,
                  progress: bool = True) -> list[StageResult]:
    """`earlier` (the results of stages the caller just ran) completed with export and optimize and,
    when `quantized`, quantize: each run here only when missing, and skipped by its manifest when current."""
    if earlier is None:
        exported = run_export_stage(config, work_dir)
        earlier = [exported, run_optimize_stage(config, work_dir, export=exported)]
    if quantized and not any(r.stage == "quantize" for r in earlier):
        optimized = next(r for r in earlier if r.stage == "optimize")
        earlier = earlier + [run_quantize_stage(config, work_dir, optimize=optimized, progress=progress)]
    return earlier


FP16_NAME = "model.fp16.onnx"
INT8_FP16_NAME = "model.int8-fp16.onnx"
HALF_NAMES = {"fp16": FP16_NAME, "int8-fp16": INT8_FP16_NAME}


@dataclass
class Fp16Result(StageResult):
    warnings: list[str] = field(default_factory=list)
    earlier: list[StageResult] = field(default_factory=list)  # the export, optimize (and quantize) runs made first


def run_fp16_stage(config: Config, work_dir: str | Path, precision: str = "fp16", force: bool = False,
                   progress: bool = True, earlier: list[StageResult] | None = None) -> Fp16Result:
    """model.opt.onnx -> model.fp16.onnx, or model.int8.onnx -> model.int8-fp16.onnx: the float part in
    FP16 (export/fp16.py), checked by top-1 agreement with model.opt.onnx on the validation set.

    `earlier` are the results of the stages before it, when the caller just ran them."""
    import onnx

    from miaotui.data.datasets import data_set, summarize
    from miaotui.export.fp16 import FP32_OPS, convert_to_fp16
    from miaotui.export.quantize import compare_top1
    from miaotui.validation.thresholds import DEFAULT_BARS

    if precision not in HALF_NAMES:
        raise InputError(f"--precision {precision}: expected one of {', '.join(HALF_NAMES)}")
    warnings: list[str] = []
    agreement_set = _agreement_set(config, data_set(config, "calibration"), warnings, "FP16 top-1 agreement")
    agreement_data = summarize(agreement_set)
    earlier = stages_before(config, work_dir, earlier, precision == "int8-fp16", progress)
    source_stage, source_name = ("quantize", INT8_NAME) if precision == "int8-fp16" else ("optimize", OPT_NAME)
    source = next(r.path for r in earlier if r.stage == source_stage)
    reference = next(r.path for r in earlier if r.stage == "optimize")
    work = WorkDir(work_dir)
    name = HALF_NAMES[precision]
    inputs = {source_name: work.record(source_stage).outputs[source_name],
              OPT_NAME: work.record("optimize").outputs[OPT_NAME], "agreement data": agreement_data.fingerprint}
    external = any(n.endswith(".data") for n in work.record(source_stage).outputs)

    def produce(scratch: Path) -> dict[str, Any]:
        converted, report = convert_to_fp16(onnx.load(str(source)))
        onnx.save(converted, str(scratch / name), save_as_external_data=external, location=name + ".data")
        try:
            onnx.checker.check_model(str(scratch / name))
        except onnx.checker.ValidationError as error:
            raise CheckFailed(f"{name}: the FP16 graph fails onnx.checker: {str(error).splitlines()[0]}") from None
        agreement = compare_top1(reference, scratch / name, agreement_set.batches(), config.model.outputs[0], progress,
                                 label=f"{precision.upper()} vs FP32", reference_key=(inputs[OPT_NAME], agreement_data.fingerprint))
        bar = config.validate.get(precision, {}).get("min_top1_agreement", DEFAULT_BARS[precision]["min_top1_agreement"])
        if agreement.top1_agreement < bar:
            warnings.append(f"{name}: top-1 agreement with FP32 {agreement.top1_agreement:.4f} is below the "
                            f"[validate.{precision}] bar {bar:g}: the parity gate will fail")
        if report.values_clamped:
            warnings.append(f"{source.name}: {report.values_clamped} weight values are beyond FP16's range "
                            "(+-65504) and were clamped")
        return asdict(report) | {"fp32_ops": list(FP32_OPS), "agreement": asdict(agreement) | {"set": agreement_set.where},
                                 "warnings": warnings}

    result = run_stage(work, tool_versions(), precision, name, inputs, {"fp32_ops": list(FP32_OPS)}, produce, force,
                       Fp16Result)
    result.warnings = list(result.details.get("warnings", []))
    result.earlier = earlier
    return result
