"""The quantize stage (model.int8.onnx, by the recipe in export/recipe.py) and the FP16 stages
(model.fp16.onnx, model.int8-fp16.onnx)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from miaotui.errors import CheckFailed, InputError
from miaotui.export.quantize import Agreement
from miaotui.export.recipe import DataPlan, Int8Plan, QuantizeOptions, quantize_options
from miaotui.stages.export import tool_versions
from miaotui.stages.runner import Pipeline, StageResult, Unit
from miaotui.workdir import GRAPH_STAGES, GRAPHS


@dataclass(frozen=True)
class SearchSummary:
    target: float
    met: bool
    agreement: float
    samples: int
    kept_float: list[str]
    steps: int
    seconds: float
    int8_macs_share: float = 1.0


@dataclass
class QuantizeResult(StageResult):
    @property
    def method(self) -> str:
        return self.details["method"]

    @property
    def int8_nodes(self) -> int:
        return self.details["nodes"]["quantized"]

    @property
    def float_nodes(self) -> int:
        return self.details["nodes"]["float"]

    @property
    def quantized_ops(self) -> tuple[int, int] | None:
        """(INT8, float) among the ops the rules decide on (weight ops); None in records before it was kept."""
        ops = self.details.get("ops")
        return (ops["quantized"], ops["quantized"] + ops["float"]) if ops else None

    @property
    def smoothed_inputs(self) -> int:
        return self.details["smoothing"]["inputs"]

    @property
    def calibration_samples(self) -> int:
        return self.details["calibration"]["samples"]

    @property
    def calibration_seconds(self) -> float | None:
        """None when the ranges came from calibration.json."""
        calibration = self.details["calibration"]
        return None if calibration["cached"] else calibration["seconds"]

    @property
    def agreement(self) -> Agreement:
        return Agreement.from_details(self.details["agreement"])

    @property
    def search(self) -> SearchSummary | None:
        found = self.details.get("search")
        return SearchSummary(found["target"], found["met"], found["agreement"], found["samples"], found["kept_float"],
                             found["steps"], found["seconds"], found.get("int8_macs_share", 1.0)) if found else None

    @property
    def check(self) -> str:
        seconds = "cached" if self.calibration_seconds is None else f"{self.calibration_seconds:.1f} s"
        smoothing = f"{self.smoothed_inputs} inputs smoothed; " if self.smoothed_inputs else ""
        ops = f" ({self.quantized_ops[0]} of {self.quantized_ops[1]} weight ops)" if self.quantized_ops else ""
        text = (f"{self.int8_nodes} compute nodes INT8, {self.float_nodes} float{ops}; {smoothing}{self.method} on "
                f"{self.calibration_samples} samples ({seconds}); {self.agreement.text()}")
        if (search := self.search) is not None:
            text += (f"; search for >= {search.target:g}: {'met' if search.met else 'NOT met'} with "
                     f"{len(search.kept_float)} kept in float ({search.agreement:.4f} on {search.samples} "
                     f"held-out calibration samples, {search.int8_macs_share:.0%} of its multiply-accumulates "
                     f"left INT8, {search.steps} steps, {search.seconds:.0f} s)")
        return text


class Quantize(Unit):
    """model.opt.onnx -> model.int8.onnx (+ calibration.json, quantization.json).

    Every data batch is checked (and fingerprinted) before anything runs, so bad data fails first
    and leaves nothing behind; calibration is skipped when calibration.json holds the same key."""

    name = "quantize"
    needs = ("optimize",)
    primary = GRAPHS["int8"]
    result_type = QuantizeResult

    def __init__(self, options: QuantizeOptions | None = None):
        self.quantize_options = options
        self.data: DataPlan | None = None
        self.plan: Int8Plan | None = None

    def prepare(self, pipeline: Pipeline) -> None:
        from miaotui.export.recipe import plan_data

        self.quantize_options = self.quantize_options or quantize_options(pipeline.config)
        self.data = plan_data(pipeline.config, self.quantize_options)

    def inputs(self, pipeline: Pipeline) -> dict[str, str]:
        from miaotui.export.recipe import plan_int8

        record = pipeline.work.record("optimize")
        optimized = GRAPHS["fp32"]
        external = any(name.endswith(".data") for name in record.outputs)
        self.plan = plan_int8(pipeline.config, self.data, pipeline.result("optimize").path, record.outputs[optimized],
                              external, pipeline.work.calibration, pipeline.progress)
        return self.plan.key_inputs()

    def options(self) -> dict[str, Any]:
        return asdict(self.quantize_options)

    def tools(self) -> dict[str, str]:
        return tool_versions()

    def produce(self, pipeline: Pipeline, scratch: Path) -> dict[str, Any]:
        from miaotui.export.recipe import write_int8

        return write_int8(self.plan, scratch)


@dataclass
class HalfResult(StageResult):
    @property
    def fp16_nodes(self) -> int:
        return self.details["fp16_nodes"]

    @property
    def fp32_nodes(self) -> dict[str, int]:
        return self.details["fp32_nodes"]

    @property
    def casts_added(self) -> int:
        return self.details["casts_added"]

    @property
    def agreement(self) -> Agreement:
        return Agreement.from_details(self.details["agreement"])

    @property
    def check(self) -> str:
        kept = ", ".join(f"{op} {n}" for op, n in self.fp32_nodes.items()) or "none"
        return (f"{self.fp16_nodes} nodes FP16; kept in FP32: {kept}; {self.casts_added} casts added; "
                f"{self.agreement.text()}")


class Half(Unit):
    """model.opt.onnx -> model.fp16.onnx, or model.int8.onnx -> model.int8-fp16.onnx: the float part in
    FP16 (export/fp16.py), checked by top-1 agreement with model.opt.onnx on the validation set."""

    result_type = HalfResult

    def __init__(self, precision: str = "fp16"):
        if precision not in ("fp16", "int8-fp16"):
            raise InputError(f"--precision {precision}: expected one of fp16, int8-fp16")
        self.precision = self.name = precision
        self.source_precision = "int8" if precision == "int8-fp16" else "fp32"
        self.needs = ("optimize", "quantize") if precision == "int8-fp16" else ("optimize",)
        self.primary = GRAPHS[precision]

    def prepare(self, pipeline: Pipeline) -> None:
        from miaotui.data.datasets import data_set, summarize
        from miaotui.export.recipe import agreement_set

        self.warnings: list[str] = []
        self.agreement_set = agreement_set(pipeline.config, data_set(pipeline.config, "calibration"), self.warnings,
                                           "FP16 top-1 agreement")
        self.agreement_data = summarize(self.agreement_set)

    def _source_stage(self) -> str:
        return GRAPH_STAGES[self.source_precision]

    def inputs(self, pipeline: Pipeline) -> dict[str, str]:
        source = GRAPHS[self.source_precision]
        work = pipeline.work
        self.external = any(n.endswith(".data") for n in work.record(self._source_stage()).outputs)
        return {source: work.record(self._source_stage()).outputs[source],
                GRAPHS["fp32"]: work.record("optimize").outputs[GRAPHS["fp32"]],
                "agreement data": self.agreement_data.fingerprint}

    def options(self) -> dict[str, Any]:
        from miaotui.export.fp16 import FP32_OPS

        return {"fp32_ops": list(FP32_OPS)}

    def tools(self) -> dict[str, str]:
        return tool_versions()

    def produce(self, pipeline: Pipeline, scratch: Path) -> dict[str, Any]:
        import onnx

        from miaotui.export.fp16 import FP32_OPS, convert_to_fp16
        from miaotui.export.quantize import compare_top1
        from miaotui.validation.thresholds import DEFAULT_BARS

        config, name, precision, warnings = pipeline.config, self.primary, self.precision, self.warnings
        source = pipeline.result(self._source_stage()).path
        reference = pipeline.result("optimize").path
        converted, report = convert_to_fp16(onnx.load(str(source)))
        onnx.save(converted, str(scratch / name), save_as_external_data=self.external, location=name + ".data")
        try:
            onnx.checker.check_model(str(scratch / name))
        except onnx.checker.ValidationError as error:
            raise CheckFailed(f"{name}: the FP16 graph fails onnx.checker: {str(error).splitlines()[0]}") from None
        reference_sha = pipeline.work.record("optimize").outputs[GRAPHS["fp32"]]
        agreement = compare_top1(reference, scratch / name, self.agreement_set.batches(), config.model.outputs[0],
                                 pipeline.progress, label=f"{precision.upper()} vs FP32",
                                 reference_key=(reference_sha, self.agreement_data.fingerprint))
        bar = config.validate.get(precision, {}).get("min_top1_agreement", DEFAULT_BARS[precision]["min_top1_agreement"])
        if agreement.top1_agreement < bar:
            warnings.append(f"{name}: top-1 agreement with FP32 {agreement.top1_agreement:.4f} is below the "
                            f"[validate.{precision}] bar {bar:g}: the parity gate will fail")
        if report.values_clamped:
            warnings.append(f"{source.name}: {report.values_clamped} weight values are beyond FP16's range "
                            "(+-65504) and were clamped")
        return asdict(report) | {"fp32_ops": list(FP32_OPS), "agreement": asdict(agreement) | {"set": self.agreement_set.where},
                                 "warnings": warnings}
