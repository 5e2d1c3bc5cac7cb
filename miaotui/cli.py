"""The `miaotui` command: a thin click layer over the Python API.

Exit status: 0 ok, 1 a check failed, 2 bad usage or input. Errors are one line on stderr; progress
goes to stderr too, and every command ends with a table of what it wrote and measured on stdout.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from miaotui.config import QUANTIZE_METHODS
from miaotui.errors import InputError, MiaotuiError

# Commands of later issues: listed in --help so the whole flow is visible, refusing with exit 2.
PLANNED = {
    "run": ("CONFIG|MODEL", "Run every stage: export, optimize, quantize, build, validate."),
    "build": ("ONNX", "Compile an engine (onnxruntime, tensorrt, tensorrt-rtx)."),
    "validate": ("ENGINE", "Accuracy parity of an engine against the PyTorch reference."),
    "bench": ("ENGINE...", "Latency and throughput of engines."),
    "predict": ("ENGINE_OR_DIR TEXT...", "Classify texts with an engine."),
}


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def reports_errors(command):
    """One line on stderr and the error's exit status instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MiaotuiError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="miaotui")
def main() -> None:
    """miaotui: a PyTorch classifier -> a fast INT8 engine, with proof it still answers right.

    CONFIG is a model's TOML config file; MODEL the name of a built-in model
    (lstm-sentiment, minilm-sentiment).
    """


def _stage_command(name: str, summary: str, options=(), spinner: bool = True):
    """A command that runs one stage of a config's flow (and the stages before it, when stale).
    `options` are extra click options, passed to the stage function as keyword arguments."""

    def decorate(run):
        @reports_errors
        def command(config_or_model: str, out_dir: Path | None, force: bool, **extra) -> None:
            from miaotui.models import resolve_config

            config = resolve_config(config_or_model)
            work_dir = out_dir or Path("build") / config.name
            if spinner:
                with _console(stderr=True).status(f"{name} {config.name}"):
                    results = run(config, work_dir, force, **extra)
            else:  # the stage draws its own progress bars
                results = run(config, work_dir, force, **extra)
            for result in results:
                for warning in getattr(result, "warnings", []):
                    _console(stderr=True).print(f"[yellow]warning:[/yellow] {escape(warning)}")
            _summary(name, config, work_dir, results)

        for option in reversed(options):
            command = option(command)
        command = click.option("--force", is_flag=True, help="Redo this stage even when the manifest says it is "
                               "current (earlier stages are redone only when stale).")(command)
        command = click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                               help="Work directory (default: build/<name>).")(command)
        command = click.argument("config_or_model", metavar="CONFIG|MODEL")(command)
        return main.command(name=name, help=summary)(command)

    return decorate


@_stage_command("export", "Export the PyTorch model to ONNX and check it against PyTorch (model.onnx).")
def export(config, work_dir: Path, force: bool):
    from miaotui.export import run_export_stage

    return [run_export_stage(config, work_dir, force=force)]


@_stage_command("optimize", "Fold constants, infer shapes, drop dead nodes (model.opt.onnx), after export.")
def optimize(config, work_dir: Path, force: bool):
    from miaotui.export import run_export_stage, run_optimize_stage

    exported = run_export_stage(config, work_dir)
    return [exported, run_optimize_stage(config, work_dir, force=force, export=exported)]


@_stage_command(
    "quantize",
    "INT8 QDQ quantization with calibration data (model.int8.onnx, calibration.json, quantization.json), "
    "after export and optimize; reports top-1 agreement with FP32 on the validation set.",
    options=(
        click.option("--method", type=click.Choice(QUANTIZE_METHODS), default=None,
                     help="Calibration method (default: the config's [quantize] method, else minmax)."),
        click.option("--samples", type=int, default=None, help="Calibration samples to use (default: 512)."),
        click.option("--smooth-alpha", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="SmoothQuant strength for INT8 MatMul inputs (default 0.5; 0 turns smoothing off)."),
        click.option("--calibration", "calibration_data", default=None, metavar="NPZ|MODULE:FUNCTION",
                     help="Calibration data instead of the config's data.calibration."),
        click.option("--include", multiple=True, metavar="NODE_OR_PATTERN",
                     help="Quantize nodes whose name or op type matches this glob, whatever the rules say (repeatable)."),
        click.option("--exclude", multiple=True, metavar="NODE_OR_PATTERN",
                     help="Keep nodes whose name or op type matches this glob in float (repeatable; wins over --include)."),
    ),
    spinner=False,
)
def quantize(config, work_dir: Path, force: bool, method, samples, smooth_alpha, calibration_data, include, exclude):
    from miaotui.export import quantize_options, run_quantize_stage

    # The data is checked before anything runs; export and optimize run inside, when stale.
    options = quantize_options(config, method, samples, include, exclude, calibration_data, smooth_alpha)
    result = run_quantize_stage(config, work_dir, options, force=force)
    return [*result.earlier, result]


def _summary(command: str, config, work_dir: Path, results) -> None:
    from rich.table import Table

    table = Table(title=f"miaotui {command}: {config.name} -> {work_dir}", title_justify="left")
    for column, justify in (("stage", "left"), ("artifact", "left"), ("size", "right"), ("s", "right"), ("check", "left")):
        table.add_column(column, justify=justify)
    for result in results:
        seconds = "cached" if result.skipped else f"{result.seconds:.1f}"
        for index, path in enumerate(result.files):
            first = index == 0
            table.add_row(result.stage if first else "", path.name, _size(path.stat().st_size),
                          seconds if first else "", _check(result) if first else "")
    _console().print(table)


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def _check(result) -> str:
    if result.stage == "export":
        worst = max((max(p.max_abs_diff.values(), default=0.0) for p in result.parity), default=0.0)
        shapes = "; ".join(p.shape_text() for p in result.parity)
        return f"onnx.checker ok; vs torch max |diff| {worst:.0e} at {shapes}"
    if result.stage == "optimize":
        d = result.details
        return f"{d['nodes_before']} -> {d['nodes_after']} nodes; vs model.onnx max |diff| {d['max_abs_diff']:.0e}"
    if result.stage == "quantize":
        d = result.details
        calibration = d["calibration"]
        seconds = "cached" if calibration["cached"] else f"{calibration['seconds']:.1f} s"
        agreement = d["agreement"]
        smoothing = f"{d['smoothing']['inputs']} inputs smoothed; " if d["smoothing"]["inputs"] else ""
        text = (f"{d['nodes']['quantized']} nodes INT8, {d['nodes']['float']} float; {smoothing}{d['method']} on "
                f"{calibration['samples']} samples ({seconds}); top-1 agreement with FP32 "
                f"{agreement['top1_agreement']:.4f} on {agreement['samples']}")
        if agreement["reference_accuracy"] is not None:
            text += f"; accuracy {agreement['reference_accuracy']:.4f} -> {agreement['candidate_accuracy']:.4f}"
        return text
    return ""


@main.command()
@click.argument("path", metavar="ENGINE_OR_ONNX", type=click.Path(path_type=Path))
@reports_errors
def inspect(path: Path) -> None:
    """Show an ONNX file's inputs, outputs, opset and ops (engines: not built yet)."""
    from rich.table import Table

    from miaotui.export.inspect_onnx import summarize_onnx

    if path.suffix != ".onnx":
        raise InputError(f"{path}: expected an .onnx file (inspecting engines is not built yet)")
    summary = summarize_onnx(path)
    plain = "plain ONNX" if not summary.foreign_domains else f"custom domains: {', '.join(summary.foreign_domains)}"
    _console().print(f"{escape(str(path))}: opset {summary.opset}, {summary.size_bytes / 1e6:.1f} MB, {plain}")
    table = Table()
    for column in ("", "name", "dtype", "shape"):
        table.add_column(column)
    for kind, tensors in (("input", summary.inputs), ("output", summary.outputs)):
        for tensor in tensors:
            table.add_row(kind, escape(tensor.name), tensor.dtype, escape("[" + ", ".join(map(str, tensor.shape)) + "]"))
    _console().print(table)
    ops = ", ".join(f"{op} {n}" for op, n in summary.op_counts.items())
    _console().print(f"{sum(summary.op_counts.values())} nodes: {ops}")


def _planned_command(name: str, metavar: str, summary: str):
    @click.argument("args", nargs=-1, metavar=metavar)
    @reports_errors
    def command(args) -> None:
        raise InputError(f"'miaotui {name}' is not built yet; today 'miaotui export', 'optimize' and 'quantize' run the first stages")

    command.__doc__ = f"{summary} (not built yet)"
    return main.command(name=name, context_settings={"ignore_unknown_options": True})(command)


for _planned, (_metavar, _text) in PLANNED.items():
    _planned_command(_planned, _metavar, _text)


if __name__ == "__main__":
    main()
