"""The parity gate's judgement: an engine, run through the runtime on the validation split, against the
PyTorch reference (miaotui.stages.validate_engine runs the reference stage and calls this).

Bad usage (an engine and a config that do not belong together, data the engine cannot take, no
labels where the config asks for accuracy) raises InputError before any metric is computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from miaotui.config import Config
from miaotui.errors import InputError
from miaotui.validation.metrics import OutputMetrics, output_metrics
from miaotui.validation.reference import Reference
from miaotui.validation.thresholds import Check, bars_for, judge


@dataclass
class ParityReport:
    engine: str
    backend: str
    precision: str
    provider: str
    config: str
    validation_set: str
    samples: int
    from_work_dir: bool  # the engine was built from one of this work dir's graphs (model.opt/int8/fp16/int8-fp16.onnx)
    bars: dict[str, float]
    outputs: list[OutputMetrics]
    checks: list[Check]
    reference_cached: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)
    # Speed on real data, for the engine choice: seconds inside the engine over the validation set's batches,
    # the engine file it was (engine_sha256) and the machine it ran on (engines.choice.this_machine).
    engine_seconds: float = 0.0
    single_seconds: float = 0.0  # per call, samples one at a time, their padding trimmed (as one text is sent)
    cpu_busy_elsewhere: float | None = None  # share of the CPUs' time other processes took meanwhile (engines/timing.py)
    engine_sha256: str = ""
    machine: str = ""
    # An engine that pads one text to fixed widths (openvino) runs it on other compiled models than a
    # batch: every sample sent alone as Classifier.predict sends one text, judged by the same bars.
    one_text: OutputMetrics | None = None

    @property
    def judged(self) -> list[OutputMetrics]:
        """The metrics of every output, then of one text a call where it was judged."""
        return self.outputs + ([self.one_text] if self.one_text else [])

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]


def check_engine_matches_config(engine, config: Config) -> None:
    """Same input names and dtypes, same output names: else they do not belong together."""
    engine_inputs = {t.name: t.dtype for t in engine.inputs}
    config_inputs = {name: spec.dtype for name, spec in config.inputs.items()}
    engine_outputs = [o.name for o in engine.outputs]

    def text(items) -> str:
        return ", ".join(f"{k} {v}" for k, v in items.items()) if isinstance(items, dict) else ", ".join(items)

    if engine_inputs != config_inputs:
        raise InputError(f"{engine.path} takes inputs ({text(engine_inputs)}) but {config.path} describes "
                         f"({text(config_inputs)}): the engine and the config do not belong together")
    if engine_outputs != list(config.model.outputs):
        raise InputError(f"{engine.path} gives outputs ({text(engine_outputs)}) but {config.path} names "
                         f"({text(config.model.outputs)}): the engine and the config do not belong together")


def compare_engine(engine, validation, has_labels: bool, bars: dict[str, float],
                   reference: Reference, reference_path: Path, from_work_dir: bool, work_dir: Path,
                   progress: bool = True, prepare=None) -> tuple[int, list[OutputMetrics], list[Check], list[str], float]:
    """Run `engine` (a loaded runtime Engine) over the validation set, each batch through `prepare` first
    where given (padded as the runtime sends it), and judge it against the PyTorch `reference`: (samples,
    metrics per output, checks, warnings, seconds inside the engine)."""
    import time

    from miaotui.validation.reference import collect_outputs

    names = [o.name for o in engine.outputs]
    inside = [0.0]

    def run_engine(feed):
        feed = prepare(feed) if prepare else feed
        started = time.perf_counter()
        try:
            return engine.run(feed)
        except InputError as error:  # name the data set too: the data does not fit this engine
            raise InputError(f"{validation.where}: {error}") from None
        finally:
            inside[0] += time.perf_counter() - started

    outputs, labels = collect_outputs(run_engine, validation.batches(), names, validation.where, progress,
                                      f"{engine.backend} {engine.metadata.precision}")
    samples = len(outputs[names[0]])
    if samples != reference.samples:
        raise InputError(f"{validation.where}: {samples} samples now, {reference.samples} in {reference_path}; "
                         "rerun with the reference recomputed")
    metrics = [output_metrics(name, reference.outputs[name], outputs[name], reference.labels if has_labels else None,
                              classifier=index == 0) for index, name in enumerate(names)]
    checks = [check for m in metrics for check in judge(m, bars if m is metrics[0] else _elementwise(bars))]
    warnings = []
    if not from_work_dir:
        warnings.append(f"{engine.path} was not built from one of {work_dir}'s ONNX graphs "
                        f"(ONNX sha256 {engine.metadata.onnx_sha256[:12]}...): the verdict is on that engine, "
                        "against this config's PyTorch model")
    return samples, metrics, checks, warnings, inside[0]


def bars_for_data(config: Config, precision: str, has_labels: bool, where: str) -> dict[str, float]:
    """The bars for `precision`; without labels the accuracy bar is dropped, unless the config sets it."""
    bars, own = bars_for(config, precision)
    if not has_labels:
        if "max_accuracy_drop" in own:
            raise InputError(f"{where}: no 'labels', but {config.path} [validate.{precision}] sets "
                             "max_accuracy_drop: the accuracy bar needs labelled validation data")
        bars.pop("max_accuracy_drop", None)
    return bars


def _elementwise(bars: dict[str, float]) -> dict[str, float]:
    """Outputs after the first are compared element-wise only (the task metrics read the first)."""
    return {k: v for k, v in bars.items() if k in ("max_abs_error", "max_mean_abs_error", "max_rel_error", "min_cosine")}
