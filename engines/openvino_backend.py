"""The openvino backend: the work dir's ONNX graph (model.int8.onnx's Q/DQ nodes are OpenVINO's INT8
input as they are) converted to an OpenVINO IR, compiled for the CPU when loaded.

The engine is the IR's .xml; its weights are the .bin beside it (ENGINE with .bin for .xml), written
with it atomically and checked by sha256 on load like the engine itself. Weights stay in the graph's
precision (save_model would compress them to FP16 by default). The CPU plugin computes an FP32 graph in
FP32 (its own default on CPUs with AMX or AVX512-BF16 is BF16, a precision the graph does not hold);
an INT8 graph's float parts run in BF16 where the CPU computes BF16 natively (`openvino_float`
"auto"): faster and, measured on the built-in models, as close to PyTorch (the gate judges the engine
as built). The IR itself holds no CPU-specific kernels: it is compiled on the machine that loads it,
in the sidecar's float precision where that machine has it (else in FP32), one compiled model per
engine and one infer request per calling thread.

An INT8 graph whose metadata records self-attention ranges (export/attention.py) is also built with
Q and K in INT8 (`openvino_attention`): OpenVINO then runs each attention block as one kernel with its
scores product in INT8. Both forms are compiled and timed at the opt shape and at 32 rows, and the INT8
one is kept only where it is at least ATTENTION_MIN_GAIN faster over both: it costs some agreement (the gate judges the engine as
built), and where BF16 attention is fast (AMX) the gain may not be there. In either form each attention's key
projection writes K^T, the layout the attention kernel reads, instead of K and a transpose of its own
(engines/openvino_key_layout.py). Likewise an INT8 graph's LSTM
layers (float in the QDQ graph) are built in INT8 form where their input has a known bound
(engines/openvino_lstm.py, `openvino_lstm`) and kept where at least LSTM_MIN_GAIN faster. And one
text a call runs on models compiled for its padded width where that is faster, and every call is padded
to one of a few widths and cut into rows of powers of two (engines/openvino_shapes.py, `openvino_one_text`;
the sidecar's session says the step the runtime pads to). A large call may run
split across the CPU plugin's streams (`openvino_streams`): one part per stream, all started at once, each
on threads of its own, where one call on every thread makes them meet at each node; kept unless the build
times the staged engine slower so (what it gains depends on how busy the machine is, hour by hour), at the
cost of a second compiled model, for calls of at least as many rows as the smallest batch it timed.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from miaotui.engines.backend import (Backend, BackendBuild, BuildJob, TensorSignature, numpy_feed, run_failed,
                                     version_tuple)
from miaotui.engines.metadata import EngineMetadata, TensorRange, batch_axis_shared
from miaotui.engines.openvino_key_layout import keys_in_attention_layout
from miaotui.engines.openvino_shapes import MIN_STEP
from miaotui.errors import InputError, first_line

WEIGHTS_SUFFIX = ".bin"
FLOAT_PRECISIONS = ("auto", "f32", "bf16")
INT8_FORM_CHOICES = ("auto", "int8", "float")  # --openvino-attention, --openvino-lstm
# INT8 attention costs some agreement: kept when at least this much faster. 1%: on Q and K only it costs
# little (MiniLM's margin-error RMS 0.049 -> 0.0525, a test text or two of 1,774) and gains 3-4% in batches on
# the Zen 4 EPYC, 1-5% on the Zen 5 (never slower in 84 repeats, paired); under the 2% of before about half the
# Zen 5's builds kept float, and MiniLM's engine then trailed NNCF's IRs by 2-4% at batch 32 (benchmarks/NOTES.md).
ATTENTION_MIN_GAIN = 0.01
ATTENTION_TIMING_ROUNDS = 15
LARGE_BATCH = 32  # the INT8 forms are also timed at this many rows (the opt width)
LARGE_BATCH_ROUNDS = 7
COST_ROUNDS = 2  # timed calls per shape for the cost table (after one that prepares the shape)
LSTM_MIN_GAIN = 0.03  # INT8 LSTM layers: kept when at least this much faster (lstm-sentiment: about 25%)
STREAMS_CHOICES = ("auto", "split", "single")  # --openvino-streams
# Calls split across streams are kept unless the build times them slower: what they gain depends on how busy the
# machine is, which changes by the hour (MiniLM on a Zen 5 EPYC, 2 vCPUs: 8-17% at 2 to 64 rows in a busy hour,
# 1-5% in a quiet one, never more than 1% slower from 8 rows; benchmarks/NOTES.md), and a build times one hour.
# What they cost, a second compiled model (MiniLM: about 80 MB with its buffers), is paid once a call splits.
STREAMS_MIN_GAIN = 0.0


def weights_path(engine: Path) -> Path:
    return engine.with_suffix(WEIGHTS_SUFFIX)


def _import_openvino():
    try:
        import openvino
    except ImportError:
        raise InputError("--backend openvino: openvino is not installed here; pip install 'miaotui[openvino]'") from None
    return openvino


def native_bf16(ov) -> bool:
    """Whether this CPU computes BF16 natively (OpenVINO lists BF16 among its capabilities then)."""
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def float_precision(ov, requested: str, graph_precision: str) -> str:
    """The CPU plugin's inference precision for the graph's float parts. An FP32 graph stays FP32 (the
    user asked for FP32 answers); an INT8 graph's float parts run in BF16 where that is native."""
    if requested not in FLOAT_PRECISIONS:
        raise InputError(f"--openvino-float {requested}: expected one of {', '.join(FLOAT_PRECISIONS)}")
    if requested == "bf16" and not native_bf16(ov):
        raise InputError("--openvino-float bf16: this CPU has no native BF16 (AMX or AVX512-BF16); use f32 or auto")
    if requested == "auto":
        return "bf16" if graph_precision.startswith("int8") and native_bf16(ov) else "f32"
    return requested


def _compile_config(precision_hint: str, threads: int | None, streams: bool = False) -> dict[str, Any]:
    """LATENCY: one stream, every thread on each call; THROUGHPUT: the threads in streams of their own, as many
    as the CPU plugin finds best for them (2 vCPUs: two of one thread)."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "THROUGHPUT" if streams else "LATENCY",
                              "INFERENCE_PRECISION_HINT": precision_hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


@dataclass(frozen=True)
class OneTextForms:
    """Where one text a call runs on models compiled for [1, width] (engines/openvino_shapes.py)."""

    step: int
    seq_min: int
    seq_max: int

    def fixed(self, arrays: dict[str, np.ndarray]) -> int | None:
        """The width when `arrays` is one row at one of the fixed widths, else None."""
        from miaotui.engines.openvino_shapes import padded_width

        shapes = {array.shape for array in arrays.values()}
        if len(shapes) != 1:
            return None
        (shape,) = shapes
        if len(shape) != 2 or shape[0] != 1:
            return None
        return shape[1] if padded_width(shape[1], self.step, self.seq_min, self.seq_max) == shape[1] else None


def read_ir(xml: Path, weights: Path):
    """(an OpenVINO Core, the IR read as a model), or one line saying why not."""
    ov = _import_openvino()
    try:
        core = ov.Core()
        return core, core.read_model(str(xml), str(weights))
    except Exception as error:  # OpenVINO raises its own RuntimeError for unreadable IR
        raise InputError(f"{xml}: OpenVINO cannot load this engine ({first_line(error)}): rebuild it") from None


def compile_model(core, model, where: Path, precision_hint: str, threads: int | None, streams: bool = False):
    try:
        return core.compile_model(model, "CPU", _compile_config(precision_hint, threads, streams))
    except Exception as error:
        raise InputError(f"{where}: OpenVINO cannot load this engine ({first_line(error)}): rebuild it") from None


def with_static_shape(model, width: int):
    """A copy of `model` whose [batch, seq] inputs are fixed at [1, width]."""
    ov = _import_openvino()
    copy = model.clone()
    copy.reshape({port.get_any_name(): ov.PartialShape([1, width]) for port in copy.inputs})
    return copy


class StreamParts:
    """The model compiled in streams (the THROUGHPUT hint: on 2 vCPUs two streams of a thread each), a call's rows
    run one part per stream, the parts started together on the calling thread's own requests. One call on every
    thread makes them meet at each node; on a shared machine each meeting waits for the thread the hypervisor
    held back (benchmarks/NOTES.md, twenty-second session)."""

    def __init__(self, compiled, positions: list[int]):
        self.compiled = compiled
        self.streams = int(compiled.get_property("NUM_STREAMS"))
        self._positions = positions
        self._local = threading.local()

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The rows in one part per stream (as even as they divide), started together; outputs joined in order."""
        from miaotui.engines.call_split import row_slices

        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = [self.compiled.create_infer_request() for _ in range(self.streams)]
        sizes = np.diff(np.linspace(0, _rows(feed), self.streams + 1).round().astype(int)).tolist()
        started, failure = [], None
        for request, part in zip(requests, row_slices(feed, sizes)):
            try:
                request.start_async(part)
            except Exception as error:  # OpenVINO's RuntimeError; the inputs passed the sidecar's checks
                failure = error
                break
            started.append(request)
        for request in started:  # every started part is waited for: none runs on into this thread's next call
            try:
                request.wait()
            except Exception as error:
                failure = failure or error
        if failure is not None:
            raise run_failed("OpenVINO", feed, failure)
        return [np.concatenate([request.get_output_tensor(position).data for request in requests])
                for position in self._positions]


class OpenVINORunner:
    """One compiled model, plus (with `one_text`) one compiled for each fixed width that one text a call
    has come at, and (with `split_from_rows`) one compiled in streams for calls of at least that many rows
    (and a row per stream); an infer request per calling thread and compiled model (a request holds its
    tensors)."""

    def __init__(self, core, model, where: Path, precision_hint: str, threads: int | None, output_names: list[str],
                 one_text: OneTextForms | None = None, split_from_rows: int | None = None):
        self.compiled = compile_model(core, model, where, precision_hint, threads)
        # Calls of at least split_from_rows rows (and a row per stream) run in StreamParts, compiled on the first
        # call that large (compile_streams): a service of one text a request never holds it (about 80 MiB for
        # MiniLM).
        self.split_from_rows = split_from_rows
        self._parts: StreamParts | None = None
        self._streams_lock = threading.Lock()
        self.provider = f"OpenVINO CPU ({self.compiled.get_property('INFERENCE_PRECISION_HINT').to_string()})"
        self.output_names = output_names
        # By position: a fixed-width model is a copy of the same model, its outputs in the same order
        outputs = self.compiled.outputs
        self._positions = [next(i for i, port in enumerate(outputs) if name in port.get_names()) for name in output_names]
        self.one_text = one_text
        self._core, self._model, self._where, self._hint, self._threads = core, model, where, precision_hint, threads
        self._fixed: dict[int, Any] = {}  # width -> compiled model
        self._fixed_lock = threading.Lock()
        self._local = threading.local()

    def _request(self, width: int | None):
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = {}
        request = requests.get(width)
        if request is None:
            compiled = self.compiled if width is None else self._compiled_at(width)
            request = requests[width] = compiled.create_infer_request()
        return request

    def _compiled_at(self, width: int):
        with self._fixed_lock:  # one compile per width, whichever thread comes first
            if width not in self._fixed:
                self._fixed[width] = compile_model(self._core, with_static_shape(self._model, width), self._where,
                                                   self._hint, self._threads)
            return self._fixed[width]

    def compile_fixed_widths(self) -> None:
        """Compile the model of every fixed width now (a server's start) rather than on its first call."""
        from miaotui.engines.openvino_shapes import padded_width

        if self.one_text:
            forms = self.one_text
            for width in sorted({padded_width(w, forms.step, forms.seq_min, forms.seq_max)
                                 for w in range(forms.seq_min, forms.seq_max + 1)}):
                self._compiled_at(width)

    @property
    def fixed_widths(self) -> list[int]:
        """The widths one text a call has run at so far (each a model compiled for it)."""
        return sorted(self._fixed)

    def stream_parts(self) -> StreamParts:
        """This runner's model compiled in streams, not yet used by it (what the build times against whole calls)."""
        return StreamParts(compile_model(self._core, self._model, self._where, self._hint, self._threads, streams=True),
                           self._positions)

    def split_in_streams(self, parts: StreamParts, from_rows: int) -> None:
        """Run calls of at least `from_rows` rows (and a row per stream) in `parts` from now on."""
        self._parts, self.split_from_rows = parts, from_rows

    @property
    def streams(self) -> int:
        """The streams a large call is split across: 1 before the model in streams is compiled, or where it has
        one stream (one thread: nothing to split across, calls run whole)."""
        return self._parts.streams if self._parts else 1

    def compile_streams(self) -> int:
        """Compile the model in streams now, if this runner splits calls; the number of streams."""
        if self._parts is None and self.split_from_rows is not None:
            with self._streams_lock:
                if self._parts is None and self.split_from_rows is not None:
                    parts = self.stream_parts()
                    if parts.streams > 1:
                        self._parts = parts
                    else:
                        self.split_from_rows = None
        return self.streams

    def run(self, arrays: dict[str, object]) -> list[np.ndarray]:
        feed = numpy_feed(arrays)
        if self.split_from_rows is not None and _rows(feed) >= self.split_from_rows and self.compile_streams() > 1 \
                and _rows(feed) >= self.streams:
            return self._parts.run(feed)
        request = self._request(self.one_text.fixed(feed) if self.one_text else None)
        try:
            results = request.infer(feed)
        except Exception as error:  # OpenVINO's RuntimeError; the inputs passed the sidecar's checks
            raise run_failed("OpenVINO", feed, error) from None
        return [np.array(results[position]) for position in self._positions]  # copies: the request reuses its buffers

    def signature(self):
        def describe(ports):
            described = []
            for port in ports:
                shape = port.get_partial_shape()
                bounds = tuple((d.get_min_length(), d.get_max_length()) for d in shape)
                described.append(TensorSignature(port.get_any_name(), port.get_element_type().to_dtype().name,
                                                 tuple(d.get_length() if d.is_static else None for d in shape), bounds))
            return described

        return describe(self.compiled.inputs), describe(self.compiled.outputs)


def _rows(feed: dict[str, np.ndarray]) -> int:
    return next(iter(feed.values())).shape[0]


def _convert(ov, onnx_path: Path, ranges: list[TensorRange]):
    """The ONNX graph as an OpenVINO model whose dynamic dims are bounded by the engine's shape ranges."""
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as error:
        raise InputError(f"{onnx_path}: OpenVINO could not convert the graph ({first_line(error)})") from None
    shapes = {}
    for tensor in ranges:
        dims = [ov.Dimension(lo) if lo == hi else ov.Dimension(lo, hi) for lo, hi in zip(tensor.min, tensor.max)]
        shapes[tensor.name] = ov.PartialShape(dims)
    try:
        model.reshape(shapes)
    except Exception as error:
        raise InputError(f"{onnx_path}: OpenVINO cannot take the shape ranges ({first_line(error)}); narrow them") from None
    return model


def _keep_reductions_unfused(model) -> list[str]:
    """OpenVINO 2026.4's CPU plugin fuses an activation FakeQuantize into a ReduceMax (or ReduceMin)
    before it and then answers differently from the graph: lstm-sentiment's INT8 head (a masked max over
    the LSTM's states, concatenated, quantized) moved by up to 1.7 in the logits and agreed with PyTorch
    on 0.954 of texts. A reduction whose output is also a model output is not fused, and then the
    answers equal ONNX Runtime's within 1e-6: so each one is made an extra output, which the runtime
    never reads. Returns their names (recorded in the sidecar)."""
    reductions = [op for op in model.get_ordered_ops() if op.get_type_name() in ("ReduceMax", "ReduceMin")]
    if reductions:
        model.add_outputs([op.output(0) for op in reductions])
    return [op.output(0).get_any_name() for op in reductions]


def _int8_form_wanted(flag: str, requested: str, onnx_path: Path, precision: str, needs: str) -> bool:
    """Whether an INT8 form (auto, int8, float) may be built from this graph; int8 asked of a float graph is
    refused in one line."""
    if requested not in INT8_FORM_CHOICES:
        raise InputError(f"{flag} {requested}: expected one of {', '.join(INT8_FORM_CHOICES)}")
    if requested == "float" or not precision.startswith("int8"):
        if requested == "int8":
            raise InputError(f"{flag} int8: {onnx_path} is a {precision} graph; {needs} an INT8 graph (miaotui quantize)")
        return False
    return True


def _attention_blocks(onnx_path: Path, requested: str, precision: str) -> tuple[list, Any]:
    """The attention ranges the INT8 graph records, when INT8 attention may be built, and the graph
    they were read from (its external weights not loaded yet); ([], None) when none may be."""
    import onnx

    from miaotui.export.attention import read_metadata

    if not _int8_form_wanted("--openvino-attention", requested, onnx_path, precision, "INT8 attention needs"):
        return [], None
    graph = onnx.load(str(onnx_path), load_external_data=False)
    blocks = read_metadata(graph)
    if requested == "int8" and not blocks:
        raise InputError(f"--openvino-attention int8: {onnx_path} records no attention ranges (a graph without "
                         "self-attention, or quantized by an older miaotui: run miaotui quantize again)")
    return blocks, graph


def _with_int8_attention(ov, graph, onnx_path: Path, blocks: list, ranges: list[TensorRange], folder: Path):
    """`graph` (read from `onnx_path`) with Q/DQ on each attention block, converted like the graph itself (its
    reductions kept unfused, as the INT8 graph's are)."""
    from onnx.external_data_helper import load_external_data_for_model

    from miaotui.export.attention import int8_attention_graph
    from miaotui.export.quantize import save_model

    load_external_data_for_model(graph, str(onnx_path.parent))
    int8_attention_graph(graph, blocks)
    path = folder / "attention.int8.onnx"
    save_model(graph, path, Path(str(onnx_path) + ".data").is_file())
    model = _convert(ov, path, ranges)
    _keep_reductions_unfused(model)
    return model


def _lstm_bounds(model, onnx_path: Path, requested: str, precision: str) -> list:
    """The model's LSTM layers that may be built in INT8 ([] when none may be)."""
    from miaotui.engines.openvino_lstm import int8_lstm_candidates

    if not _int8_form_wanted("--openvino-lstm", requested, onnx_path, precision, "INT8 LSTM layers need"):
        return []
    bounds = int8_lstm_candidates(model)
    if requested == "int8" and not bounds:
        raise InputError(f"--openvino-lstm int8: {onnx_path} has no LSTM layer whose input has a known bound (an "
                         "embedding table or another LSTM's states)")
    return bounds


def timed_shapes(ranges: list[TensorRange], config) -> list[tuple[str, dict[str, np.ndarray], int]]:
    """(sidecar key, feed, timing rounds) for each shape an INT8 form is timed at against float, and calls in
    streams against calls on one: the opt shape,
    and LARGE_BATCH rows at the opt width where the opt batch is smaller: INT8 attention gains more in large
    batches (MiniLM on a Zen 4 EPYC: 2-4% at 8 x 128, 3.6-3.8% at 32 x 128), and the opt shape alone decided
    differently from one build to the next."""
    from dataclasses import replace

    from miaotui.engines.shapes import synthetic_feed

    shapes = [("ms_at_opt", synthetic_feed(ranges, "opt", config), ATTENTION_TIMING_ROUNDS)]
    rows = min(LARGE_BATCH, ranges[0].max[0])
    if ranges[0].opt[0] < rows and batch_axis_shared(ranges):
        large = [replace(t, opt=(rows, *t.opt[1:])) for t in ranges]
        shapes.append((f"ms_at_rows_{rows}", synthetic_feed(large, "opt", config), LARGE_BATCH_ROUNDS))
    return shapes


def _keep_int8_form(ov, model, int8_form, requested: str, min_gain: float, hint: str, job: BuildJob):
    """(the model to build, what was decided): the INT8 form where asked for, or with "auto" where it timed at
    least `min_gain` faster than `model`, as the geometric mean over timed_shapes."""
    if requested != "auto":
        return int8_form, {"form": "int8"}
    forms = {"float": model, "int8": int8_form}
    decided: dict[str, Any] = {key: _faster_form(ov, forms, hint, feed, rounds)
                               for key, feed, rounds in timed_shapes(job.ranges, job.config)}
    ratio = geometric_mean([timed["int8_to_float"] for timed in decided.values()])
    faster = ratio <= 1 - min_gain
    return (int8_form if faster else model), {"form": "int8" if faster else "float", **decided,
                                              "int8_to_float": round(ratio, 4), "min_gain": min_gain}


def geometric_mean(ratios: list[float]) -> float:
    """Each shape's ratio counts alike, whatever its time."""
    return float(np.exp(np.mean(np.log(ratios))))


def form_calls(ov, forms: dict, hint: str, feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """A call of each form at `feed`, compiled as the runtime compiles them (what the build times). One
    compiled model each: timing two copies of each by the fastest (a copy's memory can land badly) slowed
    one-text calls by 20-40% with four models taking turns and misread the fixed-width forms' gain
    (benchmarks/NOTES.md)."""
    core = ov.Core()
    requests = {name: core.compile_model(model, "CPU", _compile_config(hint, None)).create_infer_request()
                for name, model in forms.items()}
    inputs = numpy_feed(feed)
    return {name: (lambda request=request: request.infer(inputs)) for name, request in requests.items()}


def _faster_form(ov, forms: dict, hint: str, feed: dict[str, np.ndarray],
                 rounds: int = ATTENTION_TIMING_ROUNDS) -> dict[str, float]:
    """Median ms per call of each of the two forms at `feed`, compiled as the runtime compiles them, rounds
    interleaved, and the second's time over the first's paired round by round (engines/timing.Interleaved.ratio),
    under "<second>_to_<first>"."""
    from miaotui.engines.timing import interleaved

    timed = interleaved(form_calls(ov, forms, hint, feed), rounds, warmup=2)
    first, second = forms
    return {name: round(ms, 3) for name, ms in timed.ms().items()} | {
        f"{second}_to_{first}": round(timed.ratio(second, first), 4)}


def _streams_form(runner: OpenVINORunner, job: BuildJob) -> tuple[int | None, dict[str, Any]]:
    """(the rows from which a call runs split across streams, or None for never; what was decided), `runner`
    (the staged engine as the runtime runs it) set to split so: where asked for, or with "auto" where its calls
    split across streams timed at least STREAMS_MIN_GAIN faster than whole (0: not slower) over timed_shapes (those
    with a row per stream), the model in streams compiled once for the timing and kept by the runner. Calls smaller
    than the smallest shape timed stay whole: served one text a request from 8 clients on the same two cores,
    MiniLM's engine splitting calls of 2-4 rows answered 7% fewer texts per second than whole calls, splitting from
    8 rows level (benchmarks/NOTES.md)."""
    from miaotui.engines.timing import interleaved

    requested = job.options.openvino_streams
    if requested not in STREAMS_CHOICES:
        raise InputError(f"--openvino-streams {requested}: expected one of {', '.join(STREAMS_CHOICES)}")
    if not (batch_axis_shared(job.ranges) and job.ranges[0].max[0] > 1):
        if requested == "split":
            raise InputError(f"--openvino-streams split: {job.onnx_path} takes no batch of rows to split (its inputs "
                             "do not share a batch axis of more than one row)")
        return None, {"form": "single"}
    shapes = [(key, feed, rounds) for key, feed, rounds in timed_shapes(job.ranges, job.config) if _rows(feed) > 1]
    from_rows = min(_rows(feed) for _, feed, _ in shapes) if shapes else 2
    if requested == "split":
        runner.split_from_rows = from_rows  # the model in streams compiled on the first call that splits
        return from_rows, {"form": "split"}
    if requested == "single":
        return None, {"form": "single"}
    parts = runner.stream_parts()
    decided: dict[str, Any] = {"streams": parts.streams}
    for key, feed, rounds in shapes:
        if parts.streams > 1 and _rows(feed) >= parts.streams:
            inputs = numpy_feed(feed)
            timed = interleaved({"single": lambda: runner.run(inputs), "split": lambda: parts.run(inputs)}, rounds,
                                warmup=2)
            decided[key] = {name: round(ms, 3) for name, ms in timed.ms().items()} | {
                "split_to_single": round(timed.ratio("split", "single"), 4)}
    ratios = [timed["split_to_single"] for key, timed in decided.items() if key.startswith("ms_at_")]
    if not ratios:  # one stream here (one thread), or no timed shape with a row per stream
        return None, {"form": "single", **decided}
    ratio = geometric_mean(ratios)
    faster = ratio <= 1 - STREAMS_MIN_GAIN
    if faster:
        runner.split_in_streams(parts, from_rows)
    return (from_rows if faster else None), {"form": "split" if faster else "single", **decided,
                                             "split_to_single": round(ratio, 4), "min_gain": STREAMS_MIN_GAIN}


def _one_text_widths(ranges: list[TensorRange]) -> list[int]:
    """The widths the build times one text at: the shortest padded width, half the opt length and the opt
    length, each padded as `predict` pads. One width is not enough: fixed widths gain most on short texts
    (MiniLM: 20-25% at 16-32 tokens, 4-10% at 128), and the opt width alone decided differently from one
    session to the next."""
    from miaotui.engines.openvino_shapes import padded_width, width_step

    low, opt, high = ranges[0].min[1], ranges[0].opt[1], ranges[0].max[1]
    step = width_step(high)
    return sorted({padded_width(width, step, low, high) for width in (low, max(low, opt // 2), opt)})


def _feed_at(ranges: list[TensorRange], config, width: int, rows: int = 1) -> dict[str, np.ndarray]:
    """`rows` rows (one text by default) of `width` tokens, every position real."""
    from dataclasses import replace

    from miaotui.engines.shapes import synthetic_feed

    return synthetic_feed([replace(t, opt=(rows, width)) for t in ranges], "opt", config)


def _call_costs(runner: "OpenVINORunner", ranges: list[TensorRange], config, step: int) -> dict:
    """The cost table (engines/openvino_shapes.CallCosts) of the staged engine as the runtime runs it (one
    text on its fixed-width model where it has them): each shape called once to prepare it, then the best of
    COST_ROUNDS calls, the rounds going over every shape in turn so a busy spell lands on all of them.
    MiniLM (1..64 x 1..256): 6 x 5 shapes, about 5 s."""
    import time

    from miaotui.engines.openvino_shapes import CallCosts, cost_rows, cost_widths
    from miaotui.engines.timing import cpu_use, record_busy

    rows = cost_rows(ranges[0].max[0])
    widths = cost_widths(step, ranges[0].min[1], ranges[0].max[1])
    feeds = {(r, w): numpy_feed(_feed_at(ranges, config, w, r)) for r in rows for w in widths}
    for feed in feeds.values():
        runner.run(feed)
    best = dict.fromkeys(feeds, float("inf"))
    with cpu_use() as use:  # not redone when busy (about 5 s): recorded, and warned of by the build
        for round_ in range(COST_ROUNDS):
            # Every call follows a call of another shape, as in predict; the rounds go forward and back so that
            # no shape always follows the largest (lstm-sentiment's 1 x 16, timed right after 32 x 256 in both
            # rounds, read 0.8-1.4 ms against 0.3 ms after a call of 1 x 32).
            for shape in (list(feeds) if round_ % 2 == 0 else list(feeds)[::-1]):
                feed = feeds[shape]
                started = time.perf_counter()
                runner.run(feed)
                best[shape] = min(best[shape], (time.perf_counter() - started) * 1000)
    record_busy(use.busy_elsewhere)
    ms = tuple(tuple(round(best[(r, w)], 3) for w in widths) for r in rows)
    return CallCosts(tuple(rows), tuple(widths), ms).to_json()


def _call_shapes(ov, model, job: BuildJob, hint: str) -> tuple[int | None, OneTextForms | None, dict[str, Any],
                                                                dict[str, Any]]:
    """(the width step calls are padded to, or None where the model cannot take padding; the fixed-width
    forms for one text, where asked for or, with "auto", where one text runs at least ONE_TEXT_MIN_GAIN faster
    on them, over a few widths; what was decided; what the padding-id check recorded, for the sidecar's
    checks). engines/openvino_shapes.py."""
    from miaotui.data.tokenizers import tokenizer_padding
    from miaotui.engines.openvino_shapes import ONE_TEXT_CHOICES, ONE_TEXT_MIN_GAIN, mask_input, unsuitable, width_step

    requested = job.options.openvino_one_text
    if requested not in ONE_TEXT_CHOICES:
        raise InputError(f"--openvino-one-text {requested}: expected one of {', '.join(ONE_TEXT_CHOICES)}")
    mask = job.config.padding_mask if job.config else None
    by_id = job.config is not None and mask_input(job.ranges, mask) is None
    pad_id = tokenizer_padding(job.config) if by_id else None
    why_not = unsuitable(job.ranges, mask, pad_id)
    step = width_step(job.ranges[0].max[1])
    checked: dict[str, Any] = {}
    if not why_not and pad_id is not None:
        why_not, checked = _padding_checked(ov, model, job, hint, pad_id, step)
    if why_not:
        if requested == "static":
            raise InputError(f"--openvino-one-text static: {job.onnx_path} cannot run one text at fixed widths: {why_not}")
        return None, None, {"form": "dynamic", "why_not": why_not}, checked
    forms = OneTextForms(step, job.ranges[0].min[1], job.ranges[0].max[1])
    if requested != "auto":
        return step, (forms if requested == "static" else None), {"form": requested}, checked
    timed = {width: _faster_form(ov, {"dynamic": model, "static": with_static_shape(model, width)}, hint,
                                 _feed_at(job.ranges, job.config, width)) for width in _one_text_widths(job.ranges)}
    ratio = geometric_mean([t["static_to_dynamic"] for t in timed.values()])
    faster = ratio <= 1 - ONE_TEXT_MIN_GAIN
    return step, (forms if faster else None), {"form": "static" if faster else "dynamic", "min_gain": ONE_TEXT_MIN_GAIN,
                                               "ms_by_width": {str(w): t for w, t in timed.items()},
                                               "static_to_dynamic": round(ratio, 4)}, checked


def _padding_checked(ov, model, job: BuildJob, hint: str, pad_id: int, step: int) -> tuple[str | None, dict[str, Any]]:
    """For a model whose padding only its tokenizer's padding id marks: whether the compiled model answers
    padded rows as unpadded ones (openvino_shapes.padding_changes_answer), at the shortest, half the opt and
    the opt width, each padded by one step and to the longest width. (why not, what the sidecar records)."""
    from miaotui.engines.openvino_shapes import padded_width, padding_changes_answer

    low, opt, high = job.ranges[0].min[1], job.ranges[0].opt[1], job.ranges[0].max[1]
    request = ov.Core().compile_model(model, "CPU", _compile_config(hint, None)).create_infer_request()
    names = [o.get_any_name() for o in model.outputs]

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = request.infer(numpy_feed(feed))
        return {name: np.array(results[name]) for name in names}

    feeds = []
    for width in sorted({low, max(low, opt // 2), opt}):
        feed = _feed_at(job.ranges, job.config, width, rows=min(2, job.ranges[0].max[0]))
        ids, real = feed["input_ids"], feed["input_ids"] != pad_id
        if real.any():
            ids[~real] = ids[real][0]  # every position a real token, so that only the added columns are padding
        feeds.append(feed)
    widths = sorted({padded_width(w + 1, step, low, high) for w in (low, opt)} | {high})
    why_not = padding_changes_answer(run, feeds, pad_id, widths)
    return why_not, {"padding_checked_with": f"input_ids id {pad_id}", "padding_checked_at": widths}


def _check(onnx_path: Path, runner: OpenVINORunner, ranges: list[TensorRange], config) -> dict:
    """The compiled IR runs at the min and max shapes, and at opt answers like ONNX Runtime on the graph;
    with fixed-width models for one text, one text at the opt width too."""
    from miaotui.engines.shapes import max_diff, run_at_extremes, synthetic_feed
    from miaotui.export.parity import onnxruntime_session

    run_at_extremes(runner.run, ranges, config, str(onnx_path), "OpenVINO")
    session = onnxruntime_session(onnx_path)
    checks: dict[str, Any] = {}
    feeds = {"vs_onnxruntime_max_abs_diff": synthetic_feed(ranges, "opt", config)}
    if runner.one_text:
        feeds["one_text_vs_onnxruntime_max_abs_diff"] = _feed_at(ranges, config, _one_text_widths(ranges)[-1])
    for key, feed in feeds.items():
        expected = session.run(runner.output_names, feed)
        checks[key] = max(max_diff(e, a) for e, a in zip(expected, runner.run(feed)))
    return checks | {"ran_at": ["min", "opt", "max"]}


class OpenVINO(Backend):
    name = "openvino"
    runtime_module = "openvino"
    suffix = ".xml"
    help = "openvino (x86-64 and ARM CPUs; the same graphs as OpenVINO IR)"
    triton_backend = "openvino"
    # After onnxruntime when nothing was measured; where the parity gate timed both engines on this
    # machine the faster one is chosen (engines/choice.py); which one depends on the model and the CPU
    # (minilm-sentiment: openvino on the AMX CPU, onnxruntime on the Zen 5 EPYC; lstm-sentiment with its
    # LSTM in INT8: openvino on the Zen 5 EPYC).
    preference = 45
    # 2: an INT8 graph's float parts in BF16 where native (openvino_float); 3: INT8 attention where faster;
    # 4: INT8 LSTM layers where faster; 6: calls padded to a few widths, one text on fixed-width models where faster;
    # 7: INT8 attention on Q and K only, fixed widths decided over three widths; 8: the cost table per call
    # shape, by which rows are cut or padded to powers of two (also where widths cannot be padded); 9: widths
    # padded where the tokenizer's padding id masks padding (checked at build), not only a mask input; 11: calls
    # of at least the smallest batch the build timed split across streams where faster; 12: split unless timed slower;
    # 13: INT8 attention where at least 1% faster (was 2%); 14: keys projected in the attention kernel's layout
    form = "14"

    def version(self) -> str:
        return _import_openvino().get_version()

    def builds_by_default(self) -> bool:
        # x86-64 is where it was measured faster (AVX2 .. AMX); on ARM ONNX Runtime stays the CPU engine
        return platform.machine().lower() in ("x86_64", "amd64") and self.installed()

    def build(self, job: BuildJob) -> BackendBuild:
        from miaotui.artifacts import sha256_file
        from miaotui.engines.onnxruntime_backend import cpu_description

        ov = _import_openvino()
        if job.foreign_domains:
            raise InputError(f"{job.onnx_path}: ops from {', '.join(job.foreign_domains)} are ONNX Runtime's own; "
                             "OpenVINO cannot convert them")
        hint = float_precision(ov, job.options.openvino_float, job.precision)
        blocks, graph = _attention_blocks(job.onnx_path, job.options.openvino_attention, job.precision)
        model = _convert(ov, job.onnx_path, job.ranges)
        unfused = _keep_reductions_unfused(model) if job.precision.startswith("int8") else []
        keys_moved = keys_in_attention_layout(model)  # in each attention form: it gains in both
        weights = job.stage_file(weights_path(Path(job.engine_name)).name)
        attention: dict[str, Any] = {"form": "float"}
        lstm: dict[str, Any] = {"form": "float"}
        with tempfile.TemporaryDirectory(prefix="miaotui-openvino-") as folder:
            if blocks:
                int8_form = _with_int8_attention(ov, graph, job.onnx_path, blocks, job.ranges, Path(folder))
                int8_keys_moved = keys_in_attention_layout(int8_form)
                model, attention = _keep_int8_form(ov, model, int8_form, job.options.openvino_attention,
                                                   ATTENTION_MIN_GAIN, hint, job)
                if attention["form"] == "int8":
                    keys_moved = int8_keys_moved  # the sidecar counts the form kept
            lstm_bounds = _lstm_bounds(model, job.onnx_path, job.options.openvino_lstm, job.precision)
            if lstm_bounds:
                from miaotui.engines.openvino_lstm import with_int8_lstm

                model, lstm = _keep_int8_form(ov, model, with_int8_lstm(model, lstm_bounds), job.options.openvino_lstm,
                                              LSTM_MIN_GAIN, hint, job)
            xml = Path(folder) / "model.xml"
            ov.save_model(model, str(xml), compress_to_fp16=False)  # the graph's precision, not FP16 weights
            shutil.copyfile(xml, job.engine_path)
            shutil.copyfile(xml.with_suffix(WEIGHTS_SUFFIX), weights)
        step, one_text, one_text_decided, padding_checked = _call_shapes(ov, model, job, hint)
        # The staged files, compiled as the runtime will compile them.
        core, staged = read_ir(job.engine_path, weights)
        output_names = [o.get_any_name() for o in model.outputs if o.get_any_name() not in unfused]
        runner = OpenVINORunner(core, staged, job.engine_path, hint, None, output_names, one_text)
        split_from_rows, streams_decided = _streams_form(runner, job)
        settings = {"precision_hint": hint, "performance_hint": "LATENCY", "unfused_outputs": unfused,
                    "attention": attention["form"], "int8_attention_blocks": len(blocks) if attention["form"] == "int8" else 0,
                    "lstm": lstm["form"], "int8_lstm_layers": len(lstm_bounds) if lstm["form"] == "int8" else 0,
                    "keys_in_attention_layout": keys_moved,
                    "one_text": one_text_decided["form"], "streams": streams_decided["form"],
                    **({"split_from_rows": split_from_rows} if split_from_rows else {}),
                    "weights_sha256": sha256_file(weights), "weights_bytes": weights.stat().st_size}
        checks = _check(job.onnx_path, runner, job.ranges, job.config)
        timed = []
        for part, decided in (("attention", attention), ("lstm", lstm), ("one_text", one_text_decided),
                              ("streams", streams_decided)):
            if "min_gain" in decided:
                checks[f"{part}_timing"] = {key: value for key, value in decided.items() if key != "form"}
                timed.append(f"{part.replace('_', '-')} form")
        if "why_not" in one_text_decided:
            checks["padded_widths_why_not"] = one_text_decided["why_not"]
        checks |= padding_checked  # padding marked by the tokenizer's id: what was checked
        session: dict[str, Any] = {"width_step": step, "one_text_fixed": one_text is not None} if step else {}
        if batch_axis_shared(job.ranges) and all(len(t.dims) == 2 for t in job.ranges):
            # What each call shape costs: Engine.run cuts a batch's rows by it, Classifier.predict its texts.
            # Without a width step the widths come as they are: the table's are timed at the smallest step.
            session["call_ms"] = _call_costs(runner, job.ranges, job.config, step or MIN_STEP)
            timed.append("call costs")
        return BackendBuild(self.version(), cpu_description(), settings, checks, session, timed=timed)

    def engine_files(self, engine: Path) -> list[Path]:
        return [weights_path(engine)]

    def check_machine(self, path: Path, metadata: EngineMetadata) -> None:
        from miaotui.artifacts import sha256_file

        ov = _import_openvino()
        here = ov.get_version().split("-")[0]
        if version_tuple(here) < version_tuple(metadata.backend_version):
            raise InputError(f"{path}: built with OpenVINO {metadata.backend_version}, this machine has {here}, which "
                             "may not read newer IR: upgrade openvino or rebuild the engine here (miaotui build)")
        weights = weights_path(path)
        if not weights.is_file():
            raise InputError(f"{weights}: the engine's weights are missing (rebuild with 'miaotui build')")
        if weights.stat().st_size != metadata.settings.get("weights_bytes") or \
                sha256_file(weights) != metadata.settings.get("weights_sha256"):
            raise InputError(f"{weights}: not the weights the sidecar describes (sha256 differs: truncated, damaged "
                             "or replaced): rebuild the engine with 'miaotui build'")
        built_on = metadata.device.get("machine")
        if built_on and built_on != platform.machine():
            raise InputError(f"{path}: built on {built_on}, this machine is {platform.machine()}: rebuild it here")

    def open(self, path: Path, metadata: EngineMetadata, threads: int | None) -> OpenVINORunner:
        hint = metadata.settings.get("precision_hint", "f32")
        if hint == "bf16" and not native_bf16(_import_openvino()):
            hint = "f32"  # emulated BF16 would be slow; FP32 is closer to the graph than what the gate judged
        step = metadata.session.get("width_step")
        one_text = (OneTextForms(step, metadata.inputs[0].min[1], metadata.inputs[0].max[1])
                    if step and metadata.session.get("one_text_fixed") else None)
        core, model = read_ir(path, weights_path(path))
        return OpenVINORunner(core, model, path, hint, threads, [o.name for o in metadata.outputs], one_text,
                              split_from_rows=metadata.settings.get("split_from_rows") if
                              metadata.settings.get("streams") == "split" else None)

    def describe(self, metadata: EngineMetadata) -> str:
        diff = metadata.checks.get("vs_onnxruntime_max_abs_diff", float("nan"))
        hint = metadata.settings.get("precision_hint")
        where = " (f32 on CPUs without native BF16)" if hint == "bf16" else ""
        attention = " (attention in INT8)" if metadata.settings.get("attention") == "int8" else ""
        if metadata.settings.get("keys_in_attention_layout"):
            attention += f" (K^T from its projection in {metadata.settings['keys_in_attention_layout']} attention blocks)"
        attention += " (LSTM layers in INT8)" if metadata.settings.get("lstm") == "int8" else ""
        attention += " (one text at fixed widths)" if metadata.settings.get("one_text") == "static" else ""
        if metadata.settings.get("streams") == "split":
            attention += f" (calls of {metadata.settings.get('split_from_rows')} rows or more split across streams)"
        if "padding_checked_with" in metadata.checks and "padded_widths_why_not" not in metadata.checks:
            attention += f" (padding marked by {metadata.checks['padding_checked_with']}, checked)"
        return (f"openvino {metadata.backend_version.split('-')[0]} IR{attention}, float parts in {hint}{where}; "
                f"ran at min/opt/max shapes; vs ONNX Runtime on the .onnx max |diff| {diff:.0e}")

    def triton_parameters(self, metadata: EngineMetadata) -> dict[str, str]:
        """Triton's openvino backend takes the performance hint, threads, streams and a BF16 hint
        (openvino_backend's src/openvino.cc, ParseParameterHelper), nothing that sets FP32 or splits a batch."""
        return {"PERFORMANCE_HINT": str(metadata.settings.get("performance_hint", "LATENCY"))}

    def triton_differences(self, metadata: EngineMetadata) -> list[str]:
        differences = []
        if metadata.settings.get("precision_hint", "f32") == "f32":
            differences.append("Triton's openvino backend cannot ask for FP32: on a CPU with native BF16 (AMX, "
                               "AVX512-BF16) it computes this engine's float parts in BF16, which the gate did not "
                               "judge")
        if metadata.settings.get("streams") == "split":
            differences.append(f"Triton's openvino backend runs each batch as one call; the engine splits calls of "
                               f"{metadata.settings.get('split_from_rows')} rows or more across the CPU's streams")
        return differences

    def triton_model(self, engine: Path, metadata: EngineMetadata, target: Path, config) -> str:
        """Triton's OpenVINO backend loads model.xml and model.bin from the version folder."""
        shutil.copyfile(engine, target / "model.xml")
        shutil.copyfile(weights_path(engine), target / "model.bin")
        return "model.xml"


BACKEND = OpenVINO()
