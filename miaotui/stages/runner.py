"""The stage runner: units with declared inputs, run in dependency order, skipped when current,
published atomically.

A unit names the stages whose outputs it reads (`needs`), checks its own data before anything runs
(`prepare`), says what makes its output stale (`inputs`, `options`, `tools`: hashed into the key the
manifest keeps), and writes its files into a scratch folder (`produce`). The runner does the rest,
like make: a unit whose key and outputs are unchanged is skipped; otherwise its files are renamed
from the scratch folder into the work dir only when `produce` succeeded (weights first, the main
artifact last), and the manifest records the run. A Pipeline runs each unit at most once.

    pipeline = Pipeline(config, "build/lstm-sentiment")
    built = pipeline.run(Build(BuildOptions(backend="onnxruntime")))   # export, optimize, quantize first
    pipeline.ran                                                      # every result, in run order
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from miaotui.artifacts import sha256_file, sha256_json
from miaotui.config import Config
from miaotui.workdir import StageRecord, WorkDir


@dataclass
class StageResult:
    stage: str
    path: Path  # the stage's main artifact
    files: list[Path]  # every file it wrote (an .onnx and, for large models, its .data)
    seconds: float = 0.0
    skipped: bool = False  # the manifest showed nothing changed
    details: dict[str, Any] = field(default_factory=dict)  # what the stage measured, as the manifest keeps it
    warnings: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    @property
    def check(self) -> str:
        """One line: what the stage checked and measured (the summary table's last column)."""
        return ""


class Unit:
    """One stage. Subclasses set `name`, `needs`, `primary` and implement inputs/produce."""

    name: str = ""  # its key in the pipeline and the manifest
    stage: str = ""  # what the summary calls it (default: name)
    needs: tuple[str, ...] = ()  # the stages whose outputs it reads
    primary: str = ""  # the main artifact, relative to the work dir
    result_type: type[StageResult] = StageResult

    def prepare(self, pipeline: "Pipeline") -> None:
        """Read and check this unit's own data; runs before any stage of the plan does."""

    def inputs(self, pipeline: "Pipeline") -> dict[str, str]:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {}

    def tools(self) -> dict[str, str]:
        return {}

    def produce(self, pipeline: "Pipeline", scratch: Path) -> dict[str, Any]:
        raise NotImplementedError


def stage_key(inputs: dict[str, str], options: dict[str, Any], tool_versions: dict[str, str]) -> str:
    return sha256_json({"inputs": inputs, "options": options, "tools": tool_versions})


def default_unit(name: str, config: Config) -> Unit:
    """The unit a pipeline runs for `name` when the caller has not given one."""
    from miaotui.stages.build import Build
    from miaotui.stages.export import Export, Optimize
    from miaotui.stages.quantize import Half, Quantize
    from miaotui.stages.reference import Reference

    if name == "export":
        return Export()
    if name == "optimize":
        return Optimize()
    if name == "quantize":
        return Quantize()
    if name in ("fp16", "int8-fp16"):
        return Half(name)
    if name == "reference":
        return Reference()
    if name.startswith("build:"):
        from miaotui.engines import BuildOptions

        _, backend, precision = name.split(":")
        return Build(BuildOptions(backend=backend, precision=precision))
    raise ValueError(f"no stage named {name!r}")


class Pipeline:
    """One config and one work dir; runs units and the units they need, each at most once."""

    def __init__(self, config: Config, work_dir: str | Path, progress: bool = True, wait: bool = True,
                 on_stage: Callable[[str, "StageResult | None"], None] | None = None):
        self.config = config
        self.work = WorkDir(work_dir)
        self.progress = progress  # progress bars inside a stage (calibration, agreement)
        self.wait = wait  # another run holds the work dir: wait for it (else fail at once)
        # Told (stage, None) when a stage starts producing and (stage, result) when it is done or found current.
        self.on_stage = on_stage or (lambda stage, result: None)
        self.units: dict[str, Unit] = {}
        self.results: dict[str, StageResult] = {}
        self.ran: list[StageResult] = []  # results in the order they were produced or found current

    def use(self, unit: Unit) -> Unit:
        """Run `unit` (with its options) wherever its name is needed."""
        self.units[unit.name] = unit
        return unit

    def unit(self, name: str) -> Unit:
        if name not in self.units:
            self.units[name] = default_unit(name, self.config)
        return self.units[name]

    def plan(self, name: str) -> list[Unit]:
        """The units `name` needs, each before the ones that read it, and `name` last."""
        order: list[Unit] = []

        def visit(current: str) -> None:
            unit = self.unit(current)
            for need in unit.needs:
                visit(need)
            if unit not in order:
                order.append(unit)

        visit(name)
        return order

    def result(self, name: str) -> StageResult:
        """The result of a stage this pipeline already ran (a unit's `needs`)."""
        return self.results[name]

    def run(self, target: str | Unit, force: bool = False) -> StageResult:
        """Run `target` after whatever it needs; `force` redoes `target` only (the stages before it
        are redone only when stale)."""
        name = self.use(target).name if isinstance(target, Unit) else target
        plan = self.plan(name)
        for unit in plan:  # every unit's data is read and checked before any stage runs
            if unit.name not in self.results:
                unit.prepare(self)
        with self.work.lock(self.wait):
            for unit in plan:
                if unit.name not in self.results or (force and unit.name == name):
                    self.results[unit.name] = self._execute(unit, force and unit.name == name)
                    self.ran.append(self.results[unit.name])
        return self.results[name]

    def _execute(self, unit: Unit, force: bool) -> StageResult:
        work = self.work
        inputs, options, tools = unit.inputs(self), unit.options(), unit.tools()
        key = stage_key(inputs, options, tools)
        stage = unit.stage or unit.name
        if not force and work.is_current(unit.name, key):
            record = work.record(unit.name)
            files = [work.path(name) for name in sorted(record.outputs, key=lambda name: name != unit.primary)]
            current = unit.result_type(stage, work.path(unit.primary), files, record.seconds, skipped=True,
                                       details=record.details, warnings=list(record.details.get("warnings", [])))
            self.on_stage(unit.name, current)
            return current

        self.on_stage(unit.name, None)
        try:
            result = self._produce(unit, stage, key, inputs, options, tools)
            self.on_stage(unit.name, result)
            return result
        except OSError as error:
            if error.filename:
                raise
            # A library that writes (onnx, torch) says "No space left on device" without a path: name the work dir.
            raise OSError(error.errno, error.strerror or str(error), str(work.root)) from error

    def _produce(self, unit: Unit, stage: str, key: str, inputs: dict, options: dict, tools: dict) -> StageResult:
        work = self.work
        started = time.perf_counter()
        with work.staging() as scratch:
            details = unit.produce(self, scratch)
            produced = sorted(p.relative_to(scratch).as_posix() for p in scratch.rglob("*") if p.is_file())
            # Weights first and the main artifact last: an .onnx must never point at a .data file that
            # is not there yet, and an engine's sidecar describes a file already in place.
            for name in sorted(produced, key=lambda name: name == unit.primary):
                work.path(name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(scratch / name, work.path(name))
            stale = work.path(unit.primary + ".data")
            if stale.exists() and all(name != unit.primary + ".data" for name in produced):
                stale.unlink()
        names = sorted(produced, key=lambda name: name != unit.primary)  # main artifact first
        files = [work.path(name) for name in names]
        seconds = time.perf_counter() - started
        outputs = {name: sha256_file(work.path(name)) for name in names}
        work.save_record(unit.name, StageRecord(key, inputs, options, tools, outputs, round(seconds, 3), details=details))
        return unit.result_type(stage, work.path(unit.primary), files, seconds, details=details,
                                warnings=list(details.get("warnings", [])))
