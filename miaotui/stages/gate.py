"""The parity gate as the pipeline runs it: the reference stage, then an engine judged against it.

    report = validate_engine("build/m/engines/m.onnxruntime.int8.ort", config, "build/m")
    report.passed, report.failures()
    flow = run_flow(config, "build/m", RunOptions(backends=("onnxruntime",)))   # `miaotui run`
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from miaotui.config import Config
from miaotui.errors import InputError
from miaotui.validation.gate import ParityReport
from miaotui.workdir import WorkDir

if TYPE_CHECKING:
    from miaotui.engines import BuildOptions


def validate_engine(engine_path: str | Path, config: Config, work_dir: str | Path, progress: bool = True,
                    threads: int | None = None) -> ParityReport:
    from miaotui.data.datasets import data_set, summarize
    from miaotui.engines.choice import this_machine
    from miaotui.engines.timing import BUSY_ELSEWHERE_WARNING, cpu_use
    from miaotui.runtime import Engine
    from miaotui.stages.reference import Reference
    from miaotui.stages.runner import Pipeline
    from miaotui.validation.gate import bars_for_data, check_engine_matches_config, compare_engine
    from miaotui.validation.thresholds import judge
    from miaotui.validation.reference import load_reference

    started = time.perf_counter()
    engine = Engine.load(engine_path, threads)
    check_engine_matches_config(engine, config)
    validation = data_set(config, "validation")  # refuses a config without data.validation
    precision = engine.metadata.precision
    summary = summarize(validation)
    bars = bars_for_data(config, precision, summary.has_labels, validation.where)
    reference_stage = Pipeline(config, work_dir, progress).run(Reference(summary=summary))
    reference = load_reference(reference_stage.path)
    from_work_dir = engine.metadata.onnx_sha256 in WorkDir(work_dir).graph_digests()
    with cpu_use() as use:  # the engine choice reads the timings below: how busy the machine was meanwhile
        samples, metrics, checks, warnings, inside = compare_engine(engine, validation, summary.has_labels, bars,
                                                                    reference, reference_stage.path, from_work_dir,
                                                                    Path(work_dir), progress, as_sent(engine, config))
        one_text = None
        if engine.one_text_fixed:
            # Before the timing: the fixed-width models are compiled on their first call, once per process
            one_text = judge_one_text(engine, validation, config, reference, bars, summary.has_labels)
            checks += judge(one_text, bars)
        single = single_call_seconds(engine, validation, config, summary.samples)
    if use.busy_elsewhere is not None and use.busy_elsewhere > BUSY_ELSEWHERE_WARNING:
        warnings.append(f"{engine.path.name}: other processes took {use.busy_elsewhere:.0%} of this machine's CPU time "
                        "while the gate timed the engine, and the engine choice (Classifier, Triton packaging) reads "
                        "those timings: validate it again when the machine is quiet (miaotui validate)")
    return ParityReport(
        engine=str(engine.path), backend=engine.backend, precision=precision, provider=engine.provider,
        config=str(config.path), validation_set=validation.where, samples=samples, from_work_dir=from_work_dir,
        bars=bars, outputs=metrics, checks=checks, reference_cached=reference_stage.skipped,
        seconds=round(time.perf_counter() - started, 3), warnings=warnings, engine_seconds=round(inside, 4),
        single_seconds=round(single, 6), cpu_busy_elsewhere=use.busy_elsewhere,
        engine_sha256=engine.metadata.engine_sha256, machine=this_machine(), one_text=one_text)


SINGLE_CALLS = 32


def as_sent(engine, config: Config):
    """How a batch reaches the engine from Classifier.predict: padded to the engine's width where it has a
    width step (Engine.padded_width), else as it is."""
    from miaotui.data.tokenizers import pad_to, tokenizer_padding

    if not engine.width_step:
        return None
    pad = tokenizer_padding(config)

    def prepare(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        width = next(iter(feed.values())).shape[1]
        return pad_to(feed, engine.padded_width(width), 0 if pad is None else pad)

    return prepare


def as_one_text(engine, row: dict[str, np.ndarray], config: Config, pad: int | None) -> dict[str, np.ndarray]:
    """A sample (a batch of one, labels dropped) cut to its real length (by the config's padding mask,
    else by the tokenizer's padding id `pad` in input_ids) and padded to the engine's width
    (Engine.padded_width): as Classifier.predict sends one text."""
    from miaotui.data.tokenizers import pad_to

    seq_min = {t.name: t.min[1] if len(t.min) > 1 else 0 for t in engine.inputs}
    if config.padding_mask and row.get(config.padding_mask, np.empty(0)).ndim == 2:
        name, real = config.padding_mask, row[config.padding_mask][0] != 0
    elif not config.padding_mask and pad is not None and row["input_ids"].ndim == 2:
        name, real = "input_ids", row["input_ids"][0] != pad
    else:
        return row
    padded = len(real)
    length = max(int(np.flatnonzero(real).max(initial=-1)) + 1, seq_min[name], 1)
    row = {key: value[:, :length] if value.ndim >= 2 and value.shape[1] == padded else value
           for key, value in row.items()}
    width = engine.padded_width(length)
    return pad_to(row, width, 0 if pad is None else pad) if width != length else row


def judge_one_text(engine, validation, config: Config, reference, bars: dict[str, float], has_labels: bool):
    """The first output's metrics over every sample sent alone as one text (as_one_text)."""
    from miaotui.data.datasets import sample_rows, without_labels
    from miaotui.data.tokenizers import tokenizer_padding
    from miaotui.validation.metrics import output_metrics

    name = engine.outputs[0].name
    pad = tokenizer_padding(config)
    answers = [engine.run(as_one_text(engine, without_labels(row), config, pad))[name]
               for row in sample_rows(validation.batches())]
    return output_metrics(f"{name}, one text a call", reference.outputs[name], np.concatenate(answers),
                          reference.labels if has_labels else None, classifier=True)


def single_call_seconds(engine, validation, config: Config, samples: int) -> float:
    """Seconds per call for SINGLE_CALLS of the set's `samples` samples, spread over it, sent one at a
    time as Classifier.predict sends one text (as_one_text), after a warm-up call: the latency side of
    the engine choice (a new input shape costs some engines more than others)."""
    from miaotui.data.datasets import spread_rows, without_labels
    from miaotui.data.tokenizers import tokenizer_padding

    pad = tokenizer_padding(config)
    rows = [as_one_text(engine, without_labels(row), config, pad) for row in spread_rows(validation, SINGLE_CALLS, samples)]
    if not rows:
        return 0.0
    engine.run(rows[0])
    started = time.perf_counter()
    for row in rows:
        engine.run(row)
    return (time.perf_counter() - started) / len(rows)


@dataclass
class GateResult:
    report: ParityReport
    written: list[Path]  # parity.json, parity.md, the JUnit XML

    @property
    def passed(self) -> bool:
        return self.report.passed


def config_for_engine(engine: Path, config_or_model: str | None) -> Config:
    """`config_or_model`, else the config.toml of the work dir the engine sits in."""
    from miaotui.models import resolve_config

    if config_or_model:
        return resolve_config(config_or_model)
    work = WorkDir.around(engine)
    if work.has_config():
        return resolve_config(work.config)
    raise InputError(f"{engine}: no {work.config.name} in its work dir; give --config CONFIG|MODEL")


def work_dir_for_engine(engine: Path, config: Config) -> WorkDir:
    """The work dir the engine sits in when it has a config, else build/<name> (where reference.npz goes)."""
    work = WorkDir.of_engine(engine)
    return work if work is not None and work.has_config() else WorkDir.for_model(config.name)


def gate_engine(engine: Path, config: Config, work_dir: str | Path | None = None, report_dir: Path | None = None,
                junit: Path | None = None, threads: int | None = None, progress: bool = True) -> GateResult:
    """Validate `engine` and write its reports (default: <work dir>/reports/<engine name>)."""
    from miaotui.validation import write_reports

    work = WorkDir(work_dir) if work_dir is not None else work_dir_for_engine(engine, config)
    if junit is not None and not junit.parent.is_dir():
        raise InputError(f"--junit {junit}: folder {junit.parent} does not exist")
    report = validate_engine(engine, config, work.root, progress=progress, threads=threads)
    return GateResult(report, write_reports(report, report_dir or work.report_dir(engine), junit))


@dataclass(frozen=True)
class RunOptions:
    backends: tuple[str, ...] = ()  # default: every backend that builds by default here
    precision: str = "int8"
    build: "BuildOptions | None" = None  # the options backend and precision are set on (TensorRT's); None: defaults


@dataclass
class FlowResult:
    """The gate on each engine `miaotui run` built that runs here, and the engines that cannot run here."""

    gates: list[GateResult] = field(default_factory=list)
    not_gated: list[tuple[Path, str]] = field(default_factory=list)  # (engine, why it cannot run here)

    @property
    def passed(self) -> bool:
        return all(gate.passed for gate in self.gates)


def build_engines(config: Config, work_dir: str | Path, options: RunOptions, force: bool = False,
                  progress: bool = True, wait: bool = True, on_stage=None):
    """Every stage up to an engine per backend; returns the pipeline (its `ran` lists the results)."""
    from dataclasses import replace

    from miaotui.engines import BuildOptions, default_backends
    from miaotui.stages.build import Build
    from miaotui.stages.runner import Pipeline

    pipeline = Pipeline(config, work_dir, progress, wait, on_stage)
    base = options.build or BuildOptions()
    for backend in options.backends or default_backends():
        pipeline.run(Build(replace(base, backend=backend, precision=options.precision)), force=force)
    return pipeline


def gate_built(config: Config, work_dir: str | Path, results: list, progress: bool = True) -> FlowResult:
    """The parity gate on every engine among `results` (a pipeline's) whose backend can run on this machine."""
    from miaotui.engines import get_backend
    from miaotui.stages.build import BuildStageResult

    flow = FlowResult()
    for result in results:
        if not isinstance(result, BuildStageResult):
            continue
        reason = get_backend(result.backend).cannot_run_here()
        if reason:
            flow.not_gated.append((result.path, reason))
            continue
        flow.gates.append(gate_engine(result.path, config, work_dir, progress=progress))
    return flow
