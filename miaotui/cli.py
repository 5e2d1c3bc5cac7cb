"""The `miaotui` command: a thin click layer over the Python API.

Exit status: 0 ok, 1 a check failed, 2 bad usage or input. Errors are one line on stderr; progress
goes to stderr too, and every command ends with a table of what it wrote and measured on stdout.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import click

from miaotui.config import PRECISIONS, QUANTIZE_METHODS
from miaotui.engines.backend import backend_names, registry, triton_backends
from miaotui.errors import CheckFailed, InputError, MiaotuiError

# The design's commands, in the order of the flow (the tests check --help lists each).
COMMANDS = ("init", "run", "export", "optimize", "quantize", "build", "validate", "bench", "predict", "inspect", "package",
            "serve")


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def os_error_line(error: OSError) -> str:
    """"PATH: reason" for an OSError, whichever library raised it."""
    import os

    reason = error.strerror or (os.strerror(error.errno) if error.errno else str(error))
    path = error.filename or ""
    if error.filename2:
        path = f"{path} -> {error.filename2}"
    return f"{path}: {reason}" if path else f"{reason} ({type(error).__name__})"


def reports_errors(command):
    """One line on stderr and the error's exit status instead of a traceback; libraries' warnings
    (torch's, transformers') are not the user's business in normal output."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", module=r"(?!miaotui(\.|$))")  # user modules too
                return command(*args, **kwargs)
        except MiaotuiError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except OSError as error:  # the environment (a full disk, a read-only folder): exit 2 like bad input
            click.echo(f"error: {os_error_line(error)}", err=True)
            sys.exit(InputError.exit_code)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="miaotui")
def main() -> None:
    """miaotui: a PyTorch classifier -> a fast INT8 engine, with proof it still answers right.

    CONFIG is a model's TOML config file; MODEL the name of a built-in model
    (lstm-sentiment, minilm-sentiment).
    """


class StageProgress:
    """What the user sees while stages run, passed to a Pipeline as its on_stage. On a terminal: a
    spinner naming the stage that runs (or, where a stage draws progress bars, a line as each starts);
    elsewhere (CI logs): a plain line as each stage starts and ends, and no bars."""

    def __init__(self, config_name: str, spinner: bool):
        self.name = config_name
        self.terminal = sys.stderr.isatty()
        self.status = _console(stderr=True).status(f"{config_name}") if spinner and self.terminal else None
        self.started: dict[str, float] = {}

    @property
    def bars(self) -> bool:
        return self.terminal and self.status is None  # tqdm bars and a rich spinner would fight over the line

    def __enter__(self):
        if self.status is not None:
            self.status.__enter__()
        return self

    def __exit__(self, *exc):
        if self.status is not None:
            self.status.__exit__(*exc)

    def __call__(self, stage: str, result) -> None:
        import time

        if result is None:
            self.started[stage] = time.monotonic()
            if self.status is not None:
                self.status.update(f"{stage} {self.name}")
            else:
                click.echo(f"miaotui: {stage} {self.name} ...", err=True)
        elif self.status is None and not self.terminal:
            seconds = time.monotonic() - self.started.get(stage, time.monotonic())
            done = "current (skipped)" if result.skipped else f"done in {seconds:.1f} s"
            click.echo(f"miaotui: {stage} {self.name} {done}", err=True)


def _stage_command(name: str, summary: str, options=(), spinner: bool = True, after=None):
    """A command that runs one stage of a config's flow (and the stages before it, when stale).
    `options` are extra click options, passed to the stage function as keyword arguments;
    `after(config, work_dir, results)` runs once the summary is printed (the run command's gate)."""

    def decorate(run):
        @reports_errors
        def command(config_or_model: str, out_dir: Path | None, force: bool, no_wait: bool, **extra) -> None:
            from miaotui.models import resolve_config
            from miaotui.workdir import WorkDir

            config = resolve_config(config_or_model)
            work_dir = out_dir or WorkDir.for_model(config.name).root
            with StageProgress(config.name, spinner) as progress:
                results = run(config, work_dir, force, wait=not no_wait, progress=progress, **extra)
            for result in results:
                for warning in getattr(result, "warnings", []):
                    _console(stderr=True).print(f"[yellow]warning:[/yellow] {escape(warning)}")
            _summary(name, config, work_dir, results)
            if after is not None:
                after(config, work_dir, results)

        for option in reversed(options):
            command = option(command)
        command = click.option("--no-wait", is_flag=True, help="Fail at once when another run is using the work "
                               "dir (default: wait for it).")(command)
        command = click.option("--force", is_flag=True, help="Redo this stage even when the manifest says it is "
                               "current (earlier stages are redone only when stale).")(command)
        command = click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                               help="Work directory (default: build/<name>).")(command)
        command = click.argument("config_or_model", metavar="CONFIG|MODEL")(command)
        return main.command(name=name, help=summary)(command)

    return decorate


@_stage_command("export", "Export the PyTorch model to ONNX and check it against PyTorch (model.onnx).")
def export(config, work_dir: Path, force: bool, wait: bool, progress: StageProgress):
    from miaotui.stages import Export, Pipeline

    pipeline = Pipeline(config, work_dir, progress.bars, wait, progress)
    pipeline.run(Export(), force)
    return pipeline.ran


@_stage_command("optimize", "Fold constants, infer shapes, drop dead nodes; where the head reads only the first "
                            "token, run the last layer on that token (model.opt.onnx), after export.")
def optimize(config, work_dir: Path, force: bool, wait: bool, progress: StageProgress):
    from miaotui.stages import Optimize, Pipeline

    pipeline = Pipeline(config, work_dir, progress.bars, wait, progress)
    pipeline.run(Optimize(), force)
    return pipeline.ran


@_stage_command(
    "quantize",
    "INT8 QDQ quantization with calibration data (model.int8.onnx, calibration.json, quantization.json), "
    "after export and optimize; with --precision fp16 or int8-fp16 the float arithmetic of model.opt.onnx "
    "or model.int8.onnx in FP16 (model.fp16.onnx, model.int8-fp16.onnx). Reports top-1 agreement with FP32 "
    "on the validation set.",
    options=(
        click.option("--precision", type=click.Choice(["int8", "fp16", "int8-fp16"]), default="int8", show_default=True,
                     help="The graph to write: int8 (QDQ), fp16 (FP32 graph in half precision, normalizations, "
                          "softmax and reductions kept in FP32) or int8-fp16 (both)."),
        click.option("--method", type=click.Choice(QUANTIZE_METHODS), default=None,
                     help="Calibration method (default: the config's [quantize] method, else percentile)."),
        click.option("--samples", type=int, default=None, help="Calibration samples to use (default: 512)."),
        click.option("--smooth-alpha", type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="SmoothQuant strength for INT8 MatMul inputs (default 0.8; 0 turns smoothing off)."),
        click.option("--calibration", "calibration_data", default=None, metavar="NPZ|MODULE:FUNCTION",
                     help="Calibration data instead of the config's data.calibration."),
        click.option("--include", multiple=True, metavar="NODE_OR_PATTERN",
                     help="Quantize nodes whose name or op type matches this glob, whatever the rules say (repeatable)."),
        click.option("--exclude", multiple=True, metavar="NODE_OR_PATTERN",
                     help="Keep nodes whose name or op type matches this glob in float (repeatable; wins over --include)."),
        click.option("--target-agreement", type=click.FloatRange(0, 1, min_open=True), default=None, metavar="SHARE",
                     help="Search for the fewest weight ops kept in float that meet this top-1 agreement with FP32 on "
                          "held-out calibration samples, starting from all of them in INT8 (default: the config's "
                          "[quantize] target_top1_agreement, else the rules)."),
        click.option("--bias-correction/--no-bias-correction", default=None,
                     help="Subtract each INT8 node's mean quantization error, measured on calibration samples, from "
                          "its float bias (default: the config's [quantize] bias_correction, else on)."),
    ),
    spinner=False,
)
def quantize(config, work_dir: Path, force: bool, wait: bool, progress: StageProgress, precision, method, samples,
             smooth_alpha, calibration_data, include, exclude, target_agreement, bias_correction):
    from miaotui.stages import Half, Pipeline, Quantize, quantize_options

    int8_options = (method, samples, smooth_alpha, calibration_data, include, exclude, target_agreement, bias_correction)
    if precision == "fp16" and any(o not in (None, ()) for o in int8_options):
        raise InputError("--precision fp16: --method, --samples, --smooth-alpha, --calibration, --include, --exclude, "
                         "--target-agreement and --bias-correction are INT8 options; fp16 has no calibration")
    pipeline = Pipeline(config, work_dir, progress.bars, wait, progress)
    if precision != "fp16":
        options = quantize_options(config, method, samples, include, exclude, calibration_data, smooth_alpha,
                                   target_agreement, bias_correction)
        pipeline.run(Quantize(options), force=force and precision == "int8")
    if precision != "int8":
        pipeline.run(Half(precision), force=force)
    return pipeline.ran


def _apply(options):
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


_TENSORRT_OPTIONS = (
    click.option("--workspace", "workspace_mib", type=int, default=None, metavar="MIB",
                 help="TensorRT: workspace memory limit in MiB (default: the library's)."),
    click.option("--opt-level", "optimization_level", type=int, default=3, show_default=True,
                 help="TensorRT: builder optimization level, 0 (fast build) .. 5 (fastest engine)."),
    click.option("--compute-capability", "compute_capabilities", multiple=True, metavar="SM89",
                 help="TensorRT-RTX: a GPU generation to build for (repeatable; default: every one the library "
                      "offers from SM80 on; SM75 Turing gets an engine of its own)."),
    click.option("--version-compatible", is_flag=True,
                 help="TensorRT: a plan later TensorRT versions can run."),
    click.option("--hardware-compatibility", type=click.Choice(["ampere+", "same-compute-capability"]), default=None,
                 help="TensorRT: a plan that runs on other GPUs than the one it was built on."),
)


def _tensorrt_options(workspace_mib, optimization_level, compute_capabilities, version_compatible,
                      hardware_compatibility):
    from miaotui.engines import TensorRTOptions

    return TensorRTOptions(workspace_mib, optimization_level, tuple(compute_capabilities), version_compatible,
                           hardware_compatibility)


def _gate_built_engines(config, work_dir: Path, results) -> None:
    """`run` ends with the parity gate on every engine it built that can run here."""
    from miaotui.stages import gate_built
    from miaotui.validation.report import verdict_line

    if not sys.stderr.isatty():
        click.echo(f"miaotui: validate {config.name} ...", err=True)
    flow = gate_built(config, work_dir, results, progress=sys.stderr.isatty())
    for engine, reason in flow.not_gated:
        _console(stderr=True).print(f"validate {escape(engine.name)}: skipped, this machine cannot run it ({escape(reason)})")
    for gate in flow.gates:
        _render_gate(gate)
    failed = [f"{Path(gate.report.engine).name}: {verdict_line(gate.report)}" for gate in flow.gates if not gate.passed]
    if failed:
        raise CheckFailed("parity gate " + " | ".join(failed))


@_stage_command(
    "run",
    "Run every stage: export, optimize, quantize (or FP16, per --precision), build an engine for each --backend "
    "(default: onnxruntime, openvino on x86-64 and tensorrt-rtx where installed) into engines/, then the parity gate "
    "on each engine that runs here (exit 1 when a bar is missed).",
    options=(
        click.option("--backend", "backends", multiple=True, type=click.Choice(backend_names()),
                     help="Engine backend (repeatable; default: onnxruntime, plus openvino on x86-64 and "
                          "tensorrt-rtx where installed)."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="int8", show_default=True,
                     help="The graph the engines are built from: int8 model.int8.onnx, fp32 model.opt.onnx, fp16 "
                          "model.fp16.onnx, int8-fp16 model.int8-fp16.onnx (the last two for TensorRT GPUs)."),
        *_TENSORRT_OPTIONS,
    ),
    spinner=False,
    after=lambda config, work_dir, results: _gate_built_engines(config, work_dir, results),
)
def run(config, work_dir: Path, force: bool, wait: bool, progress: StageProgress, backends, precision, **tensorrt):
    from miaotui.engines import BuildOptions
    from miaotui.stages import RunOptions, build_engines

    options = RunOptions(tuple(backends), precision, BuildOptions(tensorrt=_tensorrt_options(**tensorrt)))
    return build_engines(config, work_dir, options, force=force, progress=progress.bars, wait=wait,
                         on_stage=progress).ran


@main.command()
@click.argument("onnx_path", metavar="ONNX", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(backend_names()), default="onnxruntime",
              show_default=True, help="Engine kind: " + ", ".join(b.help for b in registry().values()) + ".")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="The precision the ONNX graph must hold (default: whatever it holds; precision lives in the graph).")
@click.option("--shapes", multiple=True, metavar="NAME:MIN,OPT,MAX",
              help="Shape range of one input, e.g. input_ids:1x1,8x128,64x256 (repeatable; default: the config's [dims]).")
@click.option("--config", "config_or_model", default=None, metavar="CONFIG|MODEL",
              help="The model's config, for its [dims] (default: config.toml beside the ONNX file, as in a work dir).")
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="onnxruntime: the execution provider to optimize for.")
@click.option("--cpu-activations", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True,
              help="onnxruntime on the CPU, INT8 graphs: activations as uint8 with zero point 128 (the same grid as "
                   "the graph's int8; ONNX Runtime's fast CPU kernels), or exactly as the graph has them.")
@click.option("--openvino-float", type=click.Choice(["auto", "f32", "bf16"]), default="auto", show_default=True,
              help="openvino: precision of an INT8 graph's float parts on the CPU; auto is bf16 where the CPU computes "
                   "BF16 natively (AMX, AVX512-BF16), f32 elsewhere. FP32 graphs run in f32 unless bf16 is asked for.")
@click.option("--openvino-attention", type=click.Choice(["auto", "int8", "float"]), default="auto", show_default=True,
              help="openvino, INT8 graphs: self-attention's scores product (Q, K) in INT8 from the ranges the graph "
                   "records; auto keeps it where the build measures it at least 1% faster.")
@click.option("--openvino-lstm", type=click.Choice(["auto", "int8", "float"]), default="auto", show_default=True,
              help="openvino, INT8 graphs: LSTM layers in INT8 where their input has a known bound (an embedding "
                   "table, another LSTM's states); auto keeps them where the build measures them at least 3% faster.")
@click.option("--openvino-one-text", type=click.Choice(["auto", "static", "dynamic"]), default="auto", show_default=True,
              help="openvino, models that mask padding (a mask input, or the padding id, checked): one text a call "
                   "padded to the next of at most 16 widths and run on a model compiled for that shape; auto where "
                   "the build measures it at least 5% faster.")
@click.option("--openvino-streams", type=click.Choice(["auto", "split", "single"]), default="auto", show_default=True,
              help="openvino: calls of at least the opt batch split across the CPU's streams, their parts run at "
                   "once (a second compiled model); auto unless the build measures it slower.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="ENGINE",
              help="Engine file (.ort or .plan; default: engines/<name>.<backend>.<precision>.<ext> beside the ONNX file).")
@_apply(_TENSORRT_OPTIONS)
@reports_errors
def build(onnx_path: Path, backend, precision, shapes, config_or_model, provider, cpu_activations, openvino_float,
          openvino_attention, openvino_lstm, openvino_one_text, openvino_streams, output, **tensorrt) -> None:
    """Compile an ONNX file into an engine and its .json sidecar."""
    from miaotui.engines import BuildOptions, build_engine
    from miaotui.engines.build import default_engine_path
    from miaotui.models import resolve_config
    from miaotui.workdir import WorkDir

    beside = WorkDir(onnx_path.parent)
    config = None
    if config_or_model:
        config = resolve_config(config_or_model)
    elif beside.has_config():
        config = resolve_config(beside.config)
    options = BuildOptions(backend=backend, precision=precision, shapes=tuple(shapes), provider=provider,
                           tensorrt=_tensorrt_options(**tensorrt), cpu_activations=cpu_activations,
                           openvino_float=openvino_float, openvino_attention=openvino_attention,
                           openvino_lstm=openvino_lstm, openvino_one_text=openvino_one_text,
                           openvino_streams=openvino_streams)
    made_folder = None
    if output is None:
        output = default_engine_path(onnx_path, backend, precision, config)
        if not output.parent.exists():
            output.parent.mkdir()
            made_folder = output.parent
    try:
        with _console(stderr=True).status(f"build {onnx_path.name} with {backend}"):
            result = build_engine(onnx_path, output, options, config)
    except BaseException:
        if made_folder is not None and not any(made_folder.iterdir()):
            made_folder.rmdir()  # a failed build leaves nothing behind, not even the folder
        raise
    for warning in result.warnings:
        _console(stderr=True).print(f"[yellow]warning:[/yellow] {escape(warning)}")
    _engine_summary(result.metadata, result.engine)


def _engine_check(metadata) -> str:
    from miaotui.engines import get_backend

    return get_backend(metadata.backend).describe(metadata)


def _engine_summary(metadata, engine: Path) -> None:
    from rich.table import Table

    from miaotui.engines import sidecar_path

    table = Table(title=f"miaotui build: {escape(metadata.onnx_file)} -> {escape(str(engine))}", title_justify="left")
    for column, justify in (("artifact", "left"), ("size", "right"), ("s", "right"), ("check", "left")):
        table.add_column(column, justify=justify, overflow="fold")  # full file names, folded
    table.add_row(engine.name, _size(engine.stat().st_size), f"{metadata.build_seconds:.1f}", escape(_engine_check(metadata)))
    sidecar = sidecar_path(engine)
    table.add_row(sidecar.name, _size(sidecar.stat().st_size), "", f"{metadata.precision}; " + escape(_ranges_text(metadata)))
    _console().print(table)


def _ranges_text(metadata) -> str:
    from miaotui.engines.shapes import shapes_text

    return shapes_text(metadata.inputs)


def _summary(command: str, config, work_dir: Path, results) -> None:
    from rich.table import Table

    table = Table(title=f"miaotui {command}: {config.name} -> {work_dir}", title_justify="left")
    for column, justify in (("stage", "left"), ("artifact", "left"), ("size", "right"), ("s", "right"), ("check", "left")):
        table.add_column(column, justify=justify, overflow="fold")  # full file names, folded
    for result in results:
        seconds = "cached" if result.skipped else f"{result.seconds:.1f}"
        for index, path in enumerate(result.files):
            first = index == 0
            table.add_row(result.stage if first else "", path.name, _size(path.stat().st_size),
                          seconds if first else "", escape(result.check) if first else "")
    _console().print(table)


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


@main.command()
@click.argument("path", metavar="ENGINE_OR_ONNX", type=click.Path(path_type=Path))
@click.option("--layers", is_flag=True, help="INT8 ONNX: run it and its FP32 graph side by side and print each "
              "layer's SQNR against FP32 (where the INT8 model starts to drift); writes layers.json and layers.png.")
@click.option("--config", "config_or_model", default=None, metavar="CONFIG|MODEL",
              help="--layers: the config whose data to run (default: config.toml beside the ONNX file).")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FP32.onnx",
              help="--layers: the FP32 graph (default: model.opt.onnx beside the ONNX file).")
@click.option("--samples", type=click.IntRange(min=1), default=64, show_default=True,
              help="--layers: samples, spread over the validation set (else the calibration set), to run.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="--layers: folder for layers.json and layers.png (default: <work dir>/reports).")
@reports_errors
def inspect(path: Path, layers: bool, config_or_model, reference, samples, report_dir) -> None:
    """Show an engine's sidecar (and a TensorRT plan's layers, where a GPU can list them), or an ONNX
    file's inputs, outputs, opset, ops and how many nodes run in INT8 (--layers: how far each layer
    of an INT8 graph is from FP32)."""
    if layers:
        _inspect_layers(path, config_or_model, reference, samples, report_dir)
    elif path.suffix == ".onnx":
        _inspect_onnx(path)
    elif path.suffix in _engine_suffixes() or path.name.endswith(tuple(s + ".json" for s in _engine_suffixes())):
        _inspect_engine(path)
    else:
        raise InputError(f"{path}: expected an .onnx file, an engine ({', '.join(_engine_suffixes())}) or its "
                         ".json sidecar")


def _engine_suffixes() -> tuple[str, ...]:
    from miaotui.engines.backend import engine_suffixes

    return engine_suffixes()


def _inspect_layers(path: Path, config_or_model, reference, samples: int, report_dir) -> None:
    from rich.table import Table

    from miaotui.export.layers import inspect_layers

    with _console(stderr=True).status(f"run {path.name} and its FP32 graph on {samples} samples"):
        report = inspect_layers(path, config_or_model, reference, samples, report_dir)
    table = Table(title=f"miaotui inspect --layers: {escape(str(path))} vs {escape(report.reference.name)}, {samples} "
                  f"samples of {escape(report.data_where)}", title_justify="left")
    for column, justify in (("#", "right"), ("node", "left"), ("op", "left"), ("INT8", "left"), ("SQNR dB", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for row in report.rows:
        table.add_row(str(row.index), escape(row.node), row.op_type, "yes" if row.int8 else "",
                      "inf" if row.sqnr_db == float("inf") else f"{row.sqnr_db:.1f}")
    _console().print(table)
    if (worst := report.worst) is not None:
        _console().print(f"lowest SQNR: {escape(worst.node)} ({worst.op_type}) {worst.sqnr_db:.1f} dB; reports: "
                         + ", ".join(escape(str(p)) for p in report.written))


def _io_table(rows):
    from rich.table import Table

    table = Table()
    for column in ("", "name", "dtype", "shape"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))
    return table


def _inspect_onnx(path: Path) -> None:
    from miaotui.export.inspect_onnx import summarize_onnx

    summary = summarize_onnx(path)
    plain = "plain ONNX" if not summary.foreign_domains else f"custom domains: {', '.join(summary.foreign_domains)}"
    _console().print(f"{escape(str(path))}: opset {summary.opset}, {summary.size_bytes / 1e6:.1f} MB, {plain}, "
                     f"{summary.precision}")
    rows = [(kind, t.name, t.dtype, "[" + ", ".join(map(str, t.shape)) + "]")
            for kind, tensors in (("input", summary.inputs), ("output", summary.outputs)) for t in tensors]
    _console().print(_io_table(rows))
    ops = ", ".join(f"{op} {n}" for op, n in summary.op_counts.items())
    _console().print(f"{sum(summary.op_counts.values())} nodes: {ops}")
    _console().print(f"compute nodes: {summary.int8_nodes} in INT8, {summary.float_nodes} in float "
                     "(Q/DQ and Constant not counted)")


def _inspect_engine(path: Path) -> None:
    from miaotui.engines.inspect_engine import inspect_engine, timing_decisions

    report = inspect_engine(path)
    meta = report.metadata
    _console().print(f"{escape(str(report.path))}: {meta.backend} {meta.backend_version} engine, {meta.precision}, "
                     f"{_size(meta.engine_bytes)}, built {meta.built_at} in {meta.build_seconds:.1f} s")
    if not report.file_matches:
        _console().print("[red]the file's sha256 is not the sidecar's: the engine was replaced or damaged; rebuild it[/red]")
    device = ", ".join(f"{k} {v if not isinstance(v, list) else ' '.join(map(str, v))}" for k, v in meta.device.items())
    _console().print(f"built for: {escape(device)}")
    _console().print(f"from: {escape(meta.onnx_file)} (sha256 {meta.onnx_sha256[:12]}...)")
    busy = meta.checks.get("cpu_busy_elsewhere")
    if busy is not None:  # the build decided something by timing (engines/timing.cpu_use)
        from miaotui.engines.timing import BUSY_ELSEWHERE_WARNING

        doubt = ": what it timed may not be the fastest here, rebuild it on a quiet machine" if busy > BUSY_ELSEWHERE_WARNING else ""
        _console().print(f"other processes took {busy:.0%} of the CPU time while the build timed its choices{doubt}")
    for decision in timing_decisions(meta):
        line = (f"{decision.what}: {decision.chosen} ({decision.compared} {decision.ratio:.3f}, "
                f"kept at or under {decision.rule:.2f})")
        if decision.close:
            pin = f"; miaotui build {decision.pinned_by} fixes it" if decision.pinned_by else ""
            line += f": close to the rule, another build may choose otherwise{pin}"
        _console().print(escape(line))
    rows = [("input", t.name, t.dtype, f"{'x'.join(map(str, t.min))} .. {'x'.join(map(str, t.opt))} .. "
             f"{'x'.join(map(str, t.max))}") for t in meta.inputs]
    rows += [("output", t.name, t.dtype, "[" + ", ".join(map(str, t.dims)) + "]") for t in meta.outputs]
    _console().print(_io_table(rows))
    network = meta.network
    _console().print(f"ONNX compute nodes: {network.get('int8_nodes', '?')} in INT8, {network.get('float_nodes', '?')} in float")
    session = dict(meta.session)
    costs = session.pop("call_ms", None)
    if session:
        _console().print(f"session settings: {escape(str(session))}")
    if costs:  # the build's times per call shape, which Classifier.predict cuts its batches by
        from rich.table import Table

        table = Table(title="ms a call as built (rows x tokens; predict cuts its batches by these)", title_justify="left")
        table.add_column("rows")
        for width in costs["widths"]:
            table.add_column(str(width), justify="right")
        for rows, times in zip(costs["rows"], costs["ms"]):
            table.add_row(str(rows), *(f"{ms:.2f}" for ms in times))
        _console().print(table)
    tensorrt = network.get("tensorrt")
    if report.layers:
        from rich.table import Table

        table = Table(title="engine layers (TensorRT engine inspector)", title_justify="left")
        for column in ("name", "type", "precision"):
            table.add_column(column)
        for layer in report.layers:
            table.add_row(escape(layer["name"]), escape(layer["type"]), escape(layer["precision"]))
        _console().print(table)
    elif tensorrt:
        counts = ", ".join(f"{k} {v}" for k, v in tensorrt.get("by_type", {}).items())
        types = ", ".join(f"{k} {v}" for k, v in tensorrt.get("by_output_type", {}).items())
        _console().print(f"network the builder compiled: {tensorrt.get('layers')} layers: {counts}")
        _console().print(f"layer output types: {types}")
        if report.layers_unavailable:
            _console().print(f"engine layers: not listed: {escape(report.layers_unavailable)}")


@main.command()
@click.argument("engine_or_dir", metavar="ENGINE_OR_DIR", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1, required=True, metavar="TEXT...")
@click.option("--backend", type=click.Choice(backend_names()), default=None,
              help="Which of the work dir's engines (default: one that runs here, INT8 first).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None, help="Which of the work dir's engines.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime threads (default: its choice).")
@reports_errors
def predict(engine_or_dir: Path, texts, backend, precision, threads) -> None:
    """Classify texts with an engine (a work dir, or an engine file inside one)."""
    from rich.table import Table

    from miaotui.runtime import Classifier

    classifier = Classifier.load(engine_or_dir, backend=backend, precision=precision, threads=threads)
    predictions = classifier.predict(list(texts))
    engine = classifier.engine
    table = Table(title=f"miaotui predict: {escape(str(engine.path))} ({engine.backend}, {engine.metadata.precision}, "
                  f"{engine.provider})", title_justify="left")
    for column, justify in (("text", "left"), ("label", "left"), ("score", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for text, prediction in zip(texts, predictions):
        table.add_row(escape(text), escape(prediction.label), f"{prediction.score:.3f}")
    _console().print(table)


def _render_gate(gate) -> None:
    for warning in gate.report.warnings:
        _console(stderr=True).print(f"[yellow]warning:[/yellow] {escape(warning)}")
    _parity_table(gate.report, gate.written)


def _parity_table(report, written) -> None:
    from rich.table import Table

    from miaotui.validation.report import METRIC_ROWS, metric_text, verdict_line

    colour = "green" if report.passed else "red"
    table = Table(title=f"miaotui validate: {escape(report.engine)} ({report.backend}, {report.precision}) vs PyTorch "
                  f"on {report.samples} samples", title_justify="left")
    table.add_column("metric")
    for metrics in report.judged:
        table.add_column(escape(metrics.output), justify="right")
    for label, attribute, fmt in METRIC_ROWS:
        table.add_row(label, *(metric_text(m, attribute, fmt) for m in report.judged))
    _console().print(table)
    checks = Table(show_header=True)
    for column in ("check", "value", "bar", ""):
        checks.add_column(column)
    for check in report.checks:
        sign = "<=" if check.kind == "max" else ">="
        value = "n/a" if check.value is None else f"{check.value:.6g}"
        mark = "[green]ok[/green]" if check.passed else "[red]FAILED[/red]"
        checks.add_row(escape(f"{check.output} {check.metric}"), value, f"{sign} {check.limit:g}", mark)
    _console().print(checks)
    _console().print(f"[{colour}]{escape(verdict_line(report))}[/{colour}]; reports: "
                     + ", ".join(escape(str(p)) for p in written))


@main.command()
@click.argument("engine", metavar="ENGINE", type=click.Path(path_type=Path))
@click.option("--config", "config_or_model", default=None, metavar="CONFIG|MODEL",
              help="The model's config (default: config.toml of the work dir the engine is in).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work dir holding reference.npz (default: the engine's work dir, else build/<name>).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for parity.json, parity.md, parity.xml (default: <work dir>/reports/<engine name>).")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the JUnit XML here instead of the report folder.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime threads.")
@reports_errors
def validate(engine: Path, config_or_model, out_dir, report_dir, junit, threads) -> None:
    """The parity gate: ENGINE against the PyTorch reference on the validation set.

    Exit 0 when every bar is cleared, 1 when one is missed (each named with its value and bar),
    2 on bad usage or input."""
    from miaotui.stages import config_for_engine, gate_engine
    from miaotui.validation.report import verdict_line

    config = config_for_engine(engine, config_or_model)
    gate = gate_engine(engine, config, out_dir, report_dir, junit, threads)
    _render_gate(gate)
    if not gate.passed:
        raise CheckFailed(f"parity gate {verdict_line(gate.report)}")


def _sizes(option: str, text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise InputError(f"{option} {text}: expected positive sizes separated by commas, e.g. 1,8,32")
    return sizes


@main.command()
@click.argument("engine_files", nargs=-1, metavar="ENGINE...", type=click.Path(path_type=Path))
@click.option("--torch", "torch_config", default=None, metavar="CONFIG|MODEL",
              help="Also time the PyTorch FP32 eager model of this config (the reference).")
@click.option("--batch", "batch_text", default="1,8,32", show_default=True, help="Batch sizes.")
@click.option("--seq", "seq_text", default="128", show_default=True, help="Sequence lengths (every dynamic non-batch dim).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads per subject (default: every core).")
@click.option("--seconds", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Minimum timed seconds per shape (after a warm-up).")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Interleave: load every subject at once and time each shape in this many alternating rounds "
                   "(steadier ratios on a shared machine).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for bench.json, bench.md, bench.png (default: <work dir of the first engine>/reports).")
@reports_errors
def bench(engine_files, torch_config, batch_text, seq_text, threads, seconds, rounds, report_dir) -> None:
    """Latency (p50/p90/p99) and throughput of engines and, with --torch, of the PyTorch model, each in
    its own process with the thread count set."""
    import os

    from rich.table import Table

    from miaotui.bench import default_report_dir, engine_subjects, run_bench, torch_subject, unsteady, write_bench_reports
    from miaotui.models import resolve_config

    if not engine_files and not torch_config:
        raise InputError("nothing to time: give ENGINE files and/or --torch CONFIG|MODEL")
    subjects = engine_subjects(list(engine_files))
    if torch_config:
        subjects.insert(0, torch_subject(resolve_config(torch_config).path))
    threads = threads or os.cpu_count() or 1
    rows = run_bench(subjects, _sizes("--batch", batch_text), _sizes("--seq", seq_text), threads, min_seconds=seconds,
                     rounds=rounds)
    written = write_bench_reports(rows, report_dir or default_report_dir(list(engine_files), torch_config), threads)
    how = f", interleaved in {rounds} rounds" if rounds > 1 else ""
    table = Table(title=f"miaotui bench: {threads} thread(s), each subject in its own process{how}", title_justify="left")
    for column, justify in (("subject", "left"), ("batch", "right"), ("seq", "right"), ("p50 ms", "right"),
                            ("p90 ms", "right"), ("p99 ms", "right"), ("samples/s", "right"), ("vs PyTorch", "right"),
                            ("calls", "right")):
        table.add_column(column, justify=justify, overflow="fold")
    for row in rows:
        if "skipped" in row:
            table.add_row(escape(row["name"]), str(row["batch"]), str(row["seq"]), escape(row["skipped"]), "", "", "",
                          "", "")
        else:
            ratio = f"{row['vs_torch']:.2f}x" if "vs_torch" in row else ""
            table.add_row(escape(row["name"]), str(row["batch"]), str(row["seq"]), f"{row['p50_ms']:.2f}",
                          f"{row['p90_ms']:.2f}", f"{row['p99_ms']:.2f}", f"{row['samples_per_s']:.1f}", ratio,
                          str(row["calls"]))
    _console().print(table)
    for warning in unsteady(rows):
        _console(stderr=True).print(f"[yellow]warning:[/yellow] {escape(warning)}")
    _console().print("reports: " + ", ".join(escape(str(p)) for p in written))


@main.command()
@click.argument("engine_or_dir", metavar="WORK_DIR|ENGINE", type=click.Path(path_type=Path))
@click.option("--triton", "repository", required=True, type=click.Path(path_type=Path), metavar="REPO_DIR",
              help="Triton model repository to put the model in (created when missing).")
@click.option("--backend", type=click.Choice(triton_backends()), default=None,
              help="Which of the work dir's engines (default: a TensorRT plan, else the onnxruntime engine).")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None, help="Which of the work dir's engines "
              "(default: int8 first).")
@click.option("--name", default=None, help="The model's name in the repository (default: the config's name).")
@click.option("--version", "model_version", type=click.IntRange(min=1), default=1, show_default=True,
              help="The model version folder.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances per GPU (or on the CPU).")
@click.option("--engine-threads", default="auto", show_default=True, metavar="auto|default|N",
              help="Threads of each text-model instance's engine: auto divides the server's CPUs among the "
                   "instances, default lets each engine size its pool for the whole machine.")
@click.option("--preferred-batch", "preferred_text", default=None, metavar="8,32",
              help="Dynamic batching's preferred batch sizes (default: the engine's opt and max batch, or for an engine faster in row slices its opt batch and the rows of one slice).")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=100, show_default=True,
              help="How long the dynamic batcher may hold a request to fill a preferred batch.")
@click.option("--force", is_flag=True, help="Replace a model of the same name in the repository.")
@reports_errors
def package(engine_or_dir: Path, repository: Path, backend, precision, name, model_version, instances, engine_threads,
            preferred_text, max_queue_delay_us, force) -> None:
    """A Triton Inference Server model repository entry for a built engine: config.pbtxt (checked with
    Triton's own schema), the model file in a version folder, labels.txt and the engine's sidecar."""
    from miaotui.engines.metadata import read_metadata
    from miaotui.serving.ensemble import ensemble_unavailable, package_ensemble
    from miaotui.serving.text_model import package_text_model, text_model_unavailable, tokenizer_and_labels
    from miaotui.serving.triton import TritonOptions, package_triton

    preferred = tuple(_sizes("--preferred-batch", preferred_text)) if preferred_text else ()
    options = TritonOptions(name=name, version=model_version, instances=instances, engine_threads=engine_threads,
                            max_queue_delay_us=max_queue_delay_us, preferred_batch_sizes=preferred, force=force)
    with _console(stderr=True).status(f"package {engine_or_dir} for Triton"):
        result = package_triton(engine_or_dir, repository, options, backend, precision)
        no_text = text_model_unavailable(engine_or_dir) if engine_or_dir.is_dir() else "given an engine, not a work dir"
        text = package_text_model(engine_or_dir, repository, options) if no_text is None else None
        ensemble, no_ensemble = None, no_text
        if no_text is None:
            tokenizer, labels = tokenizer_and_labels(engine_or_dir)
            no_ensemble = ensemble_unavailable(read_metadata(result.engine), result.max_batch_size, tokenizer)
            if no_ensemble is None:
                ensemble = package_ensemble(result, tokenizer, labels, repository, options)
    _console().print(f"miaotui package: {escape(str(result.engine))} -> {escape(str(result.model_dir))} "
                     f"({result.platform}, max_batch_size {result.max_batch_size}; config.pbtxt parsed with Triton's "
                     "model configuration schema)")
    for path in sorted(p for p in result.model_dir.rglob("*") if p.is_file()):
        _console().print(f"  {escape(str(path.relative_to(result.model_dir.parent)))}  {_size(path.stat().st_size)}")
    _console().print(escape(result.config_text.rstrip()))
    for difference in result.differences:
        _console().print(f"note: {escape(difference)}" + ("; the text model runs it as built" if text is not None else ""))
    if ensemble is not None:
        _console().print(f"miaotui package: {escape(ensemble.name)} (text -> {escape(result.model_dir.name)}-tokenize "
                         f"-> {escape(result.model_dir.name)} -> {escape(result.model_dir.name)}-labels: the GPU "
                         "server's form, the engine in Triton's own backend)")
    elif no_ensemble is not None and no_text is None:
        _console().print(f"no ensemble ({escape(no_ensemble)})")
    if text is None:
        _console().print(f"no text model ({escape(no_text)}): clients send the engine's tensors")
    else:
        _console().print(f"miaotui package: {escape(str(text.engine))} -> {escape(str(text.model_dir))} (text in, "
                         f"label out: Triton's Python backend running miaotui.runtime; `miaotui serve {escape(str(repository))}`)")


@main.command()
@click.argument("source", metavar="HF_FOLDER|FILE.py:FUNCTION")
@click.option("-o", "--output", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("miaotui.toml"), show_default=True, help="The config file to write.")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Calibration texts (.csv/.tsv/.jsonl/.parquet) or an .npz, for [data].")
@click.option("--validation", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Validation texts (with labels the gate checks accuracy too), for [data].")
@click.option("--force", is_flag=True, help="Replace CONFIG when it exists.")
@reports_errors
def init(source: str, config_path: Path, calibration, validation, force: bool) -> None:
    """Write a commented starter config from a Hugging Face save_pretrained folder (complete) or a
    factory's FILE.py:FUNCTION (inputs from forward(); guesses marked TODO), and print the next command."""
    from miaotui.artifacts import atomic_write_bytes
    from miaotui.models.starter import starter_config

    if config_path.exists() and not force:
        raise InputError(f"{config_path}: exists; pass --force to replace it")
    starter = starter_config(source, config_path, calibration, validation)
    atomic_write_bytes(config_path, starter.text.encode())
    click.echo(f"wrote {config_path}")  # plain lines: a path must not be wrapped
    todo = [number for number, line in enumerate(starter.text.splitlines(), 1) if "# TODO" in line]
    if todo:
        click.echo(f"check the lines marked TODO (lines {', '.join(map(str, todo))}), then:")
    click.echo(f"next: miaotui run {config_path}")


@main.command()
@click.argument("source", metavar="WORK_DIR|REPO", type=click.Path(path_type=Path))
@click.option("--model", "models", multiple=True, metavar="NAME",
              help="A repository's model to load (repeatable; default: its text models, NAME-text).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to listen on (0.0.0.0 for every interface).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--preferred-batch", "preferred_text", default=None, metavar="8,32",
              help="Dynamic batching's preferred batch sizes, when packaging a work dir (default: 8,32).")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=100, show_default=True,
              help="How long the dynamic batcher may hold a request to fill a preferred batch, when packaging.")
@reports_errors
def serve(source: Path, models, host: str, http_port: int, grpc_port: int, metrics_port: int, preferred_text,
          max_queue_delay_us: int) -> None:
    """Start a real Triton Inference Server: on a work dir (its text model is packaged into
    WORK_DIR/triton first) or on a model repository. Prints the endpoints once the model is ready;
    Ctrl-C or SIGTERM stops it (requests in flight finish)."""
    import signal

    from miaotui.serving.server import TritonServer, server_files, stub_python
    from miaotui.serving.text_model import TEXT_SUFFIX, package_text_model
    from miaotui.serving.triton import TritonOptions
    from miaotui.workdir import WorkDir

    server_files(), stub_python()  # what is missing is said before anything is written
    if not source.is_dir():
        raise InputError(f"{source}: expected a work dir or a Triton model repository")
    if WorkDir(source).config.is_file():
        preferred = tuple(_sizes("--preferred-batch", preferred_text)) if preferred_text else ()
        options = TritonOptions(max_queue_delay_us=max_queue_delay_us, preferred_batch_sizes=preferred, force=True)
        text = package_text_model(source, source / "triton", options)
        repository, models = source / "triton", models or (text.name,)
    else:
        repository = source
        models = models or tuple(sorted(p.name for p in source.iterdir() if p.name.endswith(TEXT_SUFFIX)
                                        and (p / "config.pbtxt").is_file()))
        if not models:
            raise InputError(f"{source}: no text model (NAME{TEXT_SUFFIX}/config.pbtxt) in it; name one with --model")
    server = TritonServer(repository, list(models), host, http_port, grpc_port, metrics_port)
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)

    with _console(stderr=True).status(f"starting Triton on {repository}"):
        server.start()
    try:
        click.echo(f"serving {', '.join(models)} from {repository}")
        click.echo(f"  HTTP    http://{server.http_url}   (KServe v2: /v2/models/{models[0]}/infer)")
        click.echo(f"  gRPC    {server.grpc_url}")
        click.echo(f"  metrics http://{host}:{metrics_port}/metrics")
        for line in server.engines_served():
            click.echo(f"  engine  {line}")
        body = '{"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["这本书写得很好"]}]}'
        click.echo(f"try: curl -s http://{server.http_url}/v2/models/{models[0]}/infer -d '{body}'")
        click.echo("Ctrl-C stops it.")
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        while not stopping and server.process.poll() is None:
            time.sleep(0.2)
        if server.process.poll() is not None and not stopping:
            raise MiaotuiError(f"tritonserver exited ({server.process.returncode}): {server.failure_reason()}")
    finally:
        server.stop()
    click.echo("stopped")


if __name__ == "__main__":
    main()
