"""The openvino backend: an OpenVINO IR (.xml + .bin) from the work dir's ONNX graph, compiled on load."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from miaotui.errors import InputError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                reason="openvino is not installed (pip install -e '.[openvino]'; in [dev])")


@pytest.fixture(scope="module")
def openvino_work(tmp_path_factory, lstm_work: Path) -> Path:
    """A copy of the default model's work dir with an openvino engine of its FP32 graph."""
    from miaotui.engines import BuildOptions
    from miaotui.models import resolve_config
    from miaotui.stages import run_build_stage

    work = tmp_path_factory.mktemp("openvino") / "work"
    shutil.copytree(lstm_work, work)
    for precision in ("fp32", "int8"):
        run_build_stage(resolve_config("lstm-sentiment"), work, BuildOptions(backend="openvino", precision=precision),
                        progress=False)
    return work


def _engine(work: Path) -> Path:
    return work / "engines" / "lstm-sentiment.openvino.fp32.xml"


def _ids(rows: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 3000, (rows, length)).astype(np.int64)


def test_the_ir_and_its_weights_answer_like_onnxruntime_on_the_graph(openvino_work: Path):
    from miaotui.engines import read_metadata
    from miaotui.runtime import Engine

    engine_path = _engine(openvino_work)
    weights = engine_path.with_suffix(".bin")
    assert engine_path.is_file() and weights.is_file()
    metadata = read_metadata(engine_path)
    assert metadata.backend == "openvino" and metadata.precision == "fp32"
    assert metadata.settings["precision_hint"] == "f32" and metadata.settings["weights_bytes"] == weights.stat().st_size
    assert metadata.checks["vs_onnxruntime_max_abs_diff"] < 1e-4 and metadata.checks["ran_at"] == ["min", "opt", "max"]
    engine = Engine.load(engine_path, threads=2)
    assert engine.provider == "OpenVINO CPU (f32)"
    ids = _ids(100, 33)  # more rows than the engine's 64: run in two slices
    expected = ort.InferenceSession(str(openvino_work / "model.opt.onnx"),
                                    providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(engine(input_ids=ids)["logits"], expected, atol=1e-4)
    with pytest.raises(InputError, match="dim 1 is 300, the engine takes 1..256"):
        engine(input_ids=_ids(2, 300))


def test_threads_share_one_compiled_model(openvino_work: Path):
    from miaotui.runtime import Engine

    engine = Engine.load(_engine(openvino_work))
    inputs = [_ids(1 + i % 7, 5 + 3 * i, seed=i) for i in range(16)]
    expected = [engine(input_ids=ids)["logits"] for ids in inputs]
    assert not _mismatches_from_threads(engine, inputs, expected, calls=40, atol=0)


def _mismatches_from_threads(engine, inputs: list[np.ndarray], expected: list[np.ndarray], calls: int,
                             atol: float) -> list[int]:
    """Four threads each make `calls` calls of the engine at once, going round `inputs`; the inputs whose
    answer was not `expected` (within `atol`)."""
    mismatches = []

    def worker(offset: int) -> None:
        for step in range(calls):
            index = (offset + step) % len(inputs)
            if not np.allclose(engine(input_ids=inputs[index])["logits"], expected[index], rtol=0, atol=atol):
                mismatches.append(index)

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return mismatches


def test_damaged_or_missing_weights_are_refused_in_one_line(openvino_work: Path, tmp_path: Path):
    from miaotui.runtime import Engine

    for case in ("damaged", "missing"):
        folder = tmp_path / case
        folder.mkdir()
        for path in _engine(openvino_work).parent.glob("lstm-sentiment.openvino.fp32.*"):
            shutil.copy(path, folder / path.name)
        weights = folder / "lstm-sentiment.openvino.fp32.bin"
        if case == "damaged":
            data = bytearray(weights.read_bytes())
            data[len(data) // 2] ^= 0xFF
            weights.write_bytes(bytes(data))
        else:
            weights.unlink()
        with pytest.raises(InputError) as error:
            Engine.load(folder / "lstm-sentiment.openvino.fp32.xml")
        message = str(error.value)
        assert ("sha256 differs" if case == "damaged" else "weights are missing") in message and "\n" not in message


def test_the_gate_passes_on_the_fp32_and_int8_irs(openvino_work: Path):
    from miaotui.engines import read_metadata
    from miaotui.models import resolve_config
    from miaotui.stages import validate_engine

    report = validate_engine(_engine(openvino_work), resolve_config("lstm-sentiment"), openvino_work, progress=False)
    assert report.passed, [c.sentence() for c in report.failures()]
    assert report.backend == "openvino" and report.from_work_dir
    assert report.outputs[0].top1_agreement == 1.0
    # INT8: OpenVINO would fuse the head's activation quantization into the ReduceMax before it and
    # answer differently (top-1 0.954); kept unfused, it answers like ONNX Runtime on the graph.
    # The float parts run in BF16 where the CPU has it natively ("auto"), and the gate judges that.
    from miaotui.engines.openvino_backend import native_bf16

    import openvino

    bf16 = native_bf16(openvino)
    int8 = openvino_work / "engines" / "lstm-sentiment.openvino.int8.xml"
    metadata = read_metadata(int8)
    assert metadata.settings["unfused_outputs"] == ["amax"]
    assert metadata.settings["precision_hint"] == ("bf16" if bf16 else "f32")
    # The LSTM layer in INT8 (where the build timed it faster) is not in the QDQ graph: its noise shows too.
    int8_lstm = metadata.settings["lstm"] == "int8"
    assert metadata.checks["vs_onnxruntime_max_abs_diff"] < (0.15 if int8_lstm else 0.05 if bf16 else 1e-4)
    report = validate_engine(int8, resolve_config("lstm-sentiment"), openvino_work, progress=False)
    assert report.passed and report.outputs[0].top1_agreement >= 0.995, [c.sentence() for c in report.failures()]


def test_int8_in_f32_answers_like_the_graph(openvino_work: Path, tmp_path: Path):
    """With FP32 float parts the INT8 IR answers like ONNX Runtime on the QDQ file (the ReduceMax kept
    unfused: fused, the head moved by up to 1.7)."""
    from miaotui.engines import BuildOptions, build_engine
    from miaotui.models import resolve_config
    from miaotui.runtime import Engine

    built = build_engine(openvino_work / "model.int8.onnx", tmp_path / "f32.xml",
                         BuildOptions(backend="openvino", openvino_float="f32", openvino_lstm="float"),
                         resolve_config("lstm-sentiment"))
    assert built.metadata.settings["precision_hint"] == "f32" and built.metadata.settings["unfused_outputs"] == ["amax"]
    assert built.metadata.checks["vs_onnxruntime_max_abs_diff"] < 1e-4
    assert Engine.load(tmp_path / "f32.xml").provider == "OpenVINO CPU (f32)"


def test_a_bf16_engine_runs_in_f32_where_the_cpu_has_no_bf16(openvino_work: Path, tmp_path: Path, monkeypatch):
    """The IR is compiled where it is loaded: on a CPU without native BF16 (emulated, it would be
    slow) the runtime compiles it in FP32, closer to the graph than what the gate judged."""
    import openvino

    from miaotui.engines import openvino_backend
    from miaotui.engines import read_metadata
    from miaotui.runtime import Engine

    from miaotui.engines import BuildOptions, build_engine
    from miaotui.models import resolve_config

    # LSTM float: the graph's own arithmetic, which an f32 run then matches
    int8 = build_engine(openvino_work / "model.int8.onnx", tmp_path / "bf16.xml", BuildOptions(
        backend="openvino", openvino_lstm="float"), resolve_config("lstm-sentiment")).engine
    if read_metadata(int8).settings["precision_hint"] != "bf16":
        pytest.skip("this CPU has no native BF16: the engine was built in f32")
    assert Engine.load(int8).provider == "OpenVINO CPU (bf16)"
    monkeypatch.setattr(openvino_backend, "native_bf16", lambda ov: False)  # what such a CPU reports
    engine = Engine.load(int8)
    assert engine.provider == "OpenVINO CPU (f32)"
    expected = ort.InferenceSession(str(openvino_work / "model.int8.onnx"),
                                    providers=["CPUExecutionProvider"]).run(None, {"input_ids": _ids(4, 20)})[0]
    np.testing.assert_allclose(engine(input_ids=_ids(4, 20))["logits"], expected, atol=1e-4)
    with pytest.raises(InputError, match="--openvino-float bf16: this CPU has no native BF16"):
        openvino_backend.float_precision(openvino, "bf16", "int8")


def test_triton_serves_it_with_its_openvino_backend(openvino_work: Path, tmp_path: Path):
    from miaotui.cli import main
    from miaotui.serving.model_config import parse

    repo = tmp_path / "repo"
    result = CliRunner().invoke(main, ["package", str(openvino_work), "--triton", str(repo), "--backend", "openvino",
                                       "--precision", "fp32"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    entry = repo / "lstm-sentiment"
    config = parse((entry / "config.pbtxt").read_text(), str(entry))
    assert config.backend == "openvino" and not config.platform and config.max_batch_size == 64
    assert (entry / "1" / "model.xml").read_bytes() == _engine(openvino_work).read_bytes()
    assert (entry / "1" / "model.bin").read_bytes() == _engine(openvino_work).with_suffix(".bin").read_bytes()
    # Run as built where Triton's backend has a setting for it, and told where it has none: an FP32 engine's
    # precision (Triton's backend takes a BF16 hint only), the INT8 engine's batches split across streams.
    assert config.parameters["PERFORMANCE_HINT"].string_value == "LATENCY"
    assert "note: Triton's openvino backend cannot ask for FP32" in result.output
    from miaotui.engines import read_metadata
    from miaotui.serving.triton import TritonOptions, package_triton

    int8 = openvino_work / "engines" / "lstm-sentiment.openvino.int8.xml"
    package = package_triton(int8, tmp_path / "repo-int8", TritonOptions())
    settings = read_metadata(int8).settings
    assert any("cannot ask for FP32" in d for d in package.differences) == (settings["precision_hint"] == "f32")
    assert any("across the CPU's streams" in d for d in package.differences) == (settings["streams"] == "split")


def test_a_sidecar_claiming_longer_sequences_than_the_ir_takes_is_refused(openvino_work: Path, tmp_path: Path):
    import json

    from miaotui.runtime import Engine

    for path in _engine(openvino_work).parent.glob("lstm-sentiment.openvino.fp32.*"):
        shutil.copy(path, tmp_path / path.name)
    sidecar = tmp_path / "lstm-sentiment.openvino.fp32.xml.json"
    data = json.loads(sidecar.read_text())
    data["inputs"][0]["max"] = [64, 100000]
    sidecar.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"input 'input_ids' dim 1 is 1\.\.100000, the engine takes 1\.\.256"):
        Engine.load(tmp_path / "lstm-sentiment.openvino.fp32.xml")


def test_the_engine_choice_takes_the_engine_the_gate_timed_fastest(openvino_work: Path, tmp_path: Path):
    """`miaotui run` gates every engine it builds and records how long each took on the validation set
    (batches, and one sample at a time): the work dir's choice then takes the lowest product of the two,
    and only measurements of that very engine file on this machine count."""
    import json

    from miaotui.cli import main
    from miaotui.engines.choice import choose_engine, gate_timings

    work = tmp_path / "work"
    shutil.copytree(openvino_work, work)
    engines = [work / "engines" / name for name in ("lstm-sentiment.onnxruntime.int8.ort", "lstm-sentiment.openvino.int8.xml")]
    for engine in engines:
        result = CliRunner().invoke(main, ["validate", str(engine)], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
    timings = {engine: gate_timings(work, engine) for engine in engines}
    assert all(t is not None and t[0] > 0 and t[1] > 0 for t in timings.values())
    fastest = min(engines, key=lambda engine: timings[engine][0] * timings[engine][1])
    assert choose_engine(work, precision="int8") == fastest
    # A report of another file (the engine rebuilt since) or of another machine: no measurement, and
    # the preference order decides (onnxruntime before openvino).
    for key, value in (("engine_sha256", "0" * 64), ("machine", "another CPU")):
        report_path = work / "reports" / "lstm-sentiment.openvino.int8" / "parity.json"
        report = json.loads(report_path.read_text())
        kept = report[key]
        report_path.write_text(json.dumps(report | {key: value}))
        assert gate_timings(work, engines[1]) is None
        assert choose_engine(work, precision="int8") == engines[0]
        report_path.write_text(json.dumps(report | {key: kept}))
    assert choose_engine(work, precision="int8") == fastest


def test_the_choice_rule_weighs_batches_and_single_calls_alike(tmp_path: Path):
    from miaotui.workdir import WorkDir

    a, b, c = (tmp_path / f"{name}.ort" for name in "abc")
    candidates = [(a, "onnxruntime", "int8"), (b, "openvino", "int8"), (c, "onnxruntime", "fp32")]
    order = ("onnxruntime", "openvino")
    choose = WorkDir(tmp_path).choose_engine
    timings = {a: (1.0, 3.0), b: (2.0, 1.0), c: (4.0, 4.0)}
    assert choose(candidates, None, None, order, "", lambda name: True, timings.get) == b  # 2 < 3 < 16
    assert choose(candidates, None, None, order, "", lambda name: name != "openvino", timings.get) == a  # b cannot run
    unmeasured = timings | {c: None}
    assert choose(candidates, None, None, order, "", lambda name: True, unmeasured.get) == a  # preference order
    assert choose(candidates, "openvino", None, order, "", lambda name: True, timings.get) == b


def test_the_text_model_carries_the_irs_weights(openvino_work: Path, tmp_path: Path):
    """`miaotui serve`'s text model holds a self-contained work dir: an openvino engine goes with its
    .bin (found missing once: the served model failed to load), and it answers like the engine."""
    from miaotui.runtime import Classifier
    from miaotui.serving.text_model import package_text_model

    text = package_text_model(openvino_work, tmp_path / "repo", backend="openvino", precision="int8")
    inside = text.model_dir / "1" / "work"
    assert (inside / "engines" / "lstm-sentiment.openvino.int8.bin").is_file()
    served = Classifier.load(inside).predict(["质量很好，物流也快", "太差了，完全不值这个价钱"])
    direct = Classifier.load(openvino_work, backend="openvino", precision="int8").predict(
        ["质量很好，物流也快", "太差了，完全不值这个价钱"])
    assert [p.label for p in served] == [p.label for p in direct]


@pytest.fixture(scope="module")
def tiny_bert_work(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Hugging Face BERT (two layers, random weights) quantized by `miaotui quantize`: its
    model.int8.onnx records the attention ranges. Returns (config, work dir)."""
    import csv
    import warnings

    from miaotui.cli import main
    from miaotui.data.corpus import LABELS, load_split
    from miaotui.models.huggingface_tiny import save_checkpoint

    root = tmp_path_factory.mktemp("tiny-bert")
    for split, rows in (("calibration", 64), ("validation", 64)):
        with (root / f"{split}.csv").open("w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["text", "label"])
            writer.writerows([e.text, LABELS[e.label]] for e in load_split(split)[:rows])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_checkpoint(root / "checkpoint", "bert", [e.text for e in load_split("train")[:2000]], vocab_size=300)
    config = root / "config.toml"
    runner = CliRunner()
    result = runner.invoke(main, ["init", str(root / "checkpoint"), "-o", str(config), "--calibration",
                                  str(root / "calibration.csv"), "--validation", str(root / "validation.csv")])
    assert result.exit_code == 0, result.output
    config.write_text(config.read_text().replace("seq = { min = 1, opt = 128, max = 130 }",
                                                 "seq = { min = 1, opt = 64, max = 128 }"))
    result = runner.invoke(main, ["quantize", str(config), "--out", str(root / "work")])
    assert result.exit_code == 0, result.output
    return config, root / "work"


def _fake_quantizes(xml: Path) -> int:
    return xml.read_text().count('type="FakeQuantize"')


def _int8_activation_products(xml: Path) -> int:
    """Nodes of the compiled model that multiply two activations (attention's products: a fused Subgraph or a
    MatMul, not a FullyConnected or a MatMul with weights) and read two INT8 inputs."""
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", {"INFERENCE_NUM_THREADS": 1})
    count = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        weights = any(i.get_source_output().get_node().get_rt_info()["layerType"].astype(str) == "Const" for i in op.inputs())
        if op.get_rt_info()["layerType"].astype(str) in ("Subgraph", "MatMul") and not weights:
            count += sum(str(i.get_element_type()) in ("<Type: 'int8_t'>", "<Type: 'uint8_t'>") for i in op.inputs()) >= 2
    return count


def test_the_int8_graph_records_each_attention_block_with_its_calibrated_ranges(tiny_bert_work):
    """Q, K and V are where the projections write them (before the head split), their steps are the
    calibrated ranges / 127, and the QDQ graph itself keeps the attention products in float."""
    import json

    import onnx

    from miaotui.export.attention import find_blocks, read_metadata

    _, work = tiny_bert_work
    graph = onnx.load(str(work / "model.int8.onnx"))
    recorded = read_metadata(graph)
    assert len(recorded) == 2 and [r.block for r in recorded] == find_blocks(graph)  # two layers
    assert json.loads((work / "quantization.json").read_text())["attention"] == {"blocks": 2}
    ranges = json.loads((work / "calibration.json").read_text())["ranges"]
    producers = {out: node.op_type for node in graph.graph.node for out in node.output}
    readers = {name: node.op_type for node in graph.graph.node for name in node.input}
    for ranged in recorded:
        for part in ("query", "key", "value"):
            tensor = getattr(ranged.block, part)
            assert producers[tensor] == "Add" and readers[tensor] == "Reshape"  # bias added, heads not split yet
            assert ranged.scales[part] == pytest.approx(max(map(abs, ranges[tensor])) / 127, rel=1e-6)
        assert readers[ranged.block.probabilities] == "MatMul"  # no Q/DQ in the QDQ graph's attention


def test_int8_attention_builds_each_block_in_int8_and_answers_close_to_float(tiny_bert_work, tmp_path: Path):
    from miaotui.config import load_config
    from miaotui.engines import BuildOptions, build_engine
    from miaotui.engines.openvino_backend import BACKEND
    from miaotui.runtime import Engine

    config_path, work = tiny_bert_work
    config = load_config(config_path)
    built = {form: build_engine(work / "model.int8.onnx", tmp_path / f"{form}.xml",
                                BuildOptions(backend="openvino", openvino_attention=form), config)
             for form in ("int8", "float")}
    assert built["int8"].metadata.settings["attention"] == "int8"
    assert built["int8"].metadata.settings["int8_attention_blocks"] == 2
    assert built["int8"].metadata.settings["keys_in_attention_layout"] == 2  # both forms: K^T from its projection
    assert built["float"].metadata.settings["keys_in_attention_layout"] == 2
    assert built["float"].metadata.settings["attention"] == "float"
    # Q and K of two blocks: four more FakeQuantize in the IR (V and the probabilities stay float).
    assert _fake_quantizes(tmp_path / "int8.xml") - _fake_quantizes(tmp_path / "float.xml") == 4
    assert "IR (attention in INT8) (K^T from its projection in 2 attention blocks)" in BACKEND.describe(built["int8"].metadata)
    ids = np.random.default_rng(1).integers(5, 300, (16, 40)).astype(np.int64)
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    logits = {form: Engine.load(tmp_path / f"{form}.xml", threads=2)(**inputs)["logits"] for form in built}
    spread = float(np.ptp(logits["float"]))
    difference = float(np.abs(logits["int8"] - logits["float"]).max())
    # On this tiny model the rounded scores change no answer (its attention is near uniform), so the compiled
    # model says it: each block's Q x K^T reads INT8 in the INT8 form, none does in the float one.
    assert difference < 0.1 * spread, (difference, spread)
    assert _int8_activation_products(tmp_path / "int8.xml") == 2 and _int8_activation_products(tmp_path / "float.xml") == 0


def _int8_form_timed_faster(timing: dict, min_gain: float) -> bool:
    """Whether the build's timings of an INT8 form (at the opt shape and at 32 rows) say keep it: the geometric
    mean of its time over the float form's (paired round by round at each shape) at least `min_gain` under 1,
    as recorded."""
    shapes = [key for key in timing if key.startswith("ms_at_")]
    assert shapes[0] == "ms_at_opt" and set(shapes[1:]) <= {"ms_at_rows_32"}
    for key in shapes:  # each shape's medians, and the paired ratio (a median of ratios: near theirs, not equal)
        assert set(timing[key]) == {"float", "int8", "int8_to_float"} and min(timing[key].values()) > 0
    ratio = float(np.prod([timing[key]["int8_to_float"] for key in shapes]) ** (1 / len(shapes)))
    assert timing["int8_to_float"] == pytest.approx(ratio, abs=1e-4) and timing["min_gain"] == min_gain
    return ratio <= 1 - min_gain


def test_auto_keeps_int8_attention_only_where_it_measured_faster(tiny_bert_work, tmp_path: Path):
    from miaotui.config import load_config
    from miaotui.engines import BuildOptions, build_engine
    from miaotui.engines.openvino_backend import ATTENTION_MIN_GAIN

    config_path, work = tiny_bert_work
    built = build_engine(work / "model.int8.onnx", tmp_path / "auto.xml", BuildOptions(backend="openvino"),
                         load_config(config_path))
    timing = built.metadata.checks["attention_timing"]
    faster = _int8_form_timed_faster(timing, ATTENTION_MIN_GAIN)
    assert built.metadata.settings["attention"] == ("int8" if faster else "float")
    assert _fake_quantizes(tmp_path / "auto.xml") > 0
    # Likewise one text at fixed widths, timed at the shortest padded width, half the opt width and the opt
    # width (64), kept on the geometric mean of the static / dynamic ratios
    from miaotui.engines.openvino_shapes import ONE_TEXT_MIN_GAIN

    timing = built.metadata.checks["one_text_timing"]
    assert sorted(timing["ms_by_width"], key=int) == ["16", "32", "64"]
    assert all(set(ms) == {"dynamic", "static", "static_to_dynamic"} for ms in timing["ms_by_width"].values())
    ratios = [ms["static_to_dynamic"] for ms in timing["ms_by_width"].values()]
    assert timing["static_to_dynamic"] == pytest.approx(np.prod(ratios) ** (1 / 3), abs=1e-4)
    faster = timing["static_to_dynamic"] <= 1 - ONE_TEXT_MIN_GAIN
    assert built.metadata.settings["one_text"] == ("static" if faster else "dynamic")
    assert _session_beside_its_costs(built.metadata) == {"width_step": 16, "one_text_fixed": faster}
    # inspect reads both decisions back, each with its ratio and rule
    from miaotui.engines.inspect_engine import CLOSE_TO_RULE, timing_decisions

    decisions = {d.what: d for d in timing_decisions(built.metadata)}
    streams_timed = {"streams form"} if "streams_timing" in built.metadata.checks else set()  # a machine of 2+ CPUs
    assert set(decisions) == {"attention form", "one-text form"} | streams_timed
    one_text = decisions["one-text form"]
    assert (one_text.chosen, one_text.ratio, one_text.rule) == (built.metadata.settings["one_text"],
                                                                 timing["static_to_dynamic"], 1 - ONE_TEXT_MIN_GAIN)
    assert decisions["attention form"].chosen == built.metadata.settings["attention"]
    from miaotui.cli import main

    shown = " ".join(CliRunner().invoke(main, ["inspect", str(tmp_path / "auto.xml")]).output.split())
    assert f"one-text form: {one_text.chosen} (static over dynamic {one_text.ratio:.3f}, kept at or under 0.95)" in shown
    close = abs(one_text.ratio - 0.95) < CLOSE_TO_RULE
    assert ("--openvino-one-text static|dynamic fixes it" in shown) == close, shown


def _session_beside_its_costs(metadata) -> dict:
    """The sidecar's session without its cost table, after checking the table: every row count and width the
    build times (the tiny BERT: 1..64 rows, 1..128 tokens), a time for each, and more rows and tokens costing
    more than one short text."""
    from miaotui.engines.openvino_shapes import CallCosts, cost_rows, cost_widths

    session = dict(metadata.session)
    costs = CallCosts.from_json(session.pop("call_ms"))
    ids = metadata.input("input_ids")
    assert list(costs.rows) == cost_rows(ids.max[0]) and list(costs.widths) == cost_widths(16, ids.min[1], ids.max[1])
    assert all(ms > 0 for row in costs.ms for ms in row)
    assert costs.ms[-1][-1] > 2 * costs.ms[0][0]
    return session


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.mark.skipif(_cpus() < 2, reason="streams need two CPUs: one thread is one stream")
def test_calls_split_across_streams_answer_like_one_call_from_many_threads(openvino_work: Path, tmp_path: Path):
    """With streams, a call of at least the opt batch's rows (lstm-sentiment: 8) runs in one part per stream
    at once, each calling thread with requests of its own; the answers are the single-stream engine's.
    Smaller calls, or any call with one thread (one stream), run whole; the model in streams is compiled on
    the first call that splits."""
    from miaotui.config import load_config
    from miaotui.engines import BuildOptions, build_engine
    from miaotui.engines.openvino_backend import BACKEND
    from miaotui.runtime import Engine

    config = load_config(openvino_work / "config.toml")
    built = {form: build_engine(openvino_work / "model.int8.onnx", tmp_path / f"{form}.xml",
                                BuildOptions(backend="openvino", openvino_streams=form), config)
             for form in ("split", "single")}
    assert built["split"].metadata.settings["streams"] == "split" and "streams_timing" not in built["split"].metadata.checks
    assert built["single"].metadata.settings["streams"] == "single"
    assert built["split"].metadata.settings["split_from_rows"] == 8 and "split_from_rows" not in built["single"].metadata.settings
    assert "(calls of 8 rows or more split across streams)" in BACKEND.describe(built["split"].metadata)
    diffs = {form: b.metadata.checks["vs_onnxruntime_max_abs_diff"] for form, b in built.items()}
    assert diffs["split"] == pytest.approx(diffs["single"], abs=1e-4)  # the opt shape's 8 rows, in parts or not
    split, single = Engine.load(tmp_path / "split.xml", threads=2), Engine.load(tmp_path / "single.xml", threads=2)
    runner = split._backend
    assert runner.streams == 1 and runner._parts is None  # nothing compiled in streams before a call needs it
    split(input_ids=_ids(4, 16))
    assert runner._parts is None
    split(input_ids=_ids(8, 16))
    parts, in_streams = [], runner._parts
    assert in_streams is not None and runner.streams == 2
    runner._parts = SimpleNamespace(streams=2, run=lambda feed: parts.append(feed["input_ids"].shape[0]) or in_streams.run(feed))
    inputs = [_ids(rows, 5 + 3 * rows, seed=rows) for rows in (1, 2, 3, 8, 21, 64)]
    expected = [single(input_ids=ids)["logits"] for ids in inputs]
    for ids, answer in zip(inputs, expected):
        np.testing.assert_allclose(split(input_ids=ids)["logits"], answer, atol=1e-5)
    # 21 rows run as 16, 4 and 1, or as 32 (the cost table decides): the calls of 8 rows or more split
    assert sorted(set(parts)) in ([8, 16, 64], [8, 32, 64]) and runner.streams == 2 and single._backend.streams == 1
    assert not _mismatches_from_threads(split, inputs, expected, calls=24, atol=1e-5)
    one_thread = Engine.load(tmp_path / "split.xml", threads=1)
    np.testing.assert_allclose(one_thread(input_ids=inputs[3])["logits"], expected[3], atol=1e-5)
    assert one_thread._backend.streams == 1 and one_thread._backend.split_from_rows is None


@pytest.mark.skipif(_cpus() < 2, reason="streams need two CPUs: one thread is one stream")
def test_a_call_refused_in_streams_is_one_line_and_the_next_call_answers(openvino_work: Path):
    """A call whose parts OpenVINO refuses (here a batch of rank 3, past the sidecar's checks by calling the parts
    directly) fails in one line naming the inputs, and the same thread's requests then answer the next call as a
    whole call does."""
    from miaotui.runtime import Engine

    engine = Engine.load(_engine(openvino_work), threads=2)
    runner = engine._backend
    parts = runner.stream_parts()
    assert parts.streams == 2
    good = {"input_ids": _ids(8, 12)}
    with pytest.raises(InputError, match=r"^OpenVINO failed on inputs input_ids \[8, 12, 2\]: ") as error:
        parts.run({"input_ids": np.stack([good["input_ids"]] * 2, axis=-1)})
    assert "\n" not in str(error.value)
    np.testing.assert_allclose(parts.run(good)[0], runner.run(good)[0], atol=1e-5)


def test_streams_are_refused_in_one_line_where_there_is_no_batch_to_split(openvino_work: Path, tmp_path: Path):
    from miaotui.config import load_config
    from miaotui.engines import BuildOptions, build_engine

    config = load_config(openvino_work / "config.toml")
    one_row = ("input_ids:1x1,1x16,1x64",)
    with pytest.raises(InputError, match=r"--openvino-streams split: .*model.int8.onnx takes no batch of rows to split") as error:
        build_engine(openvino_work / "model.int8.onnx", tmp_path / "one-row.xml",
                     BuildOptions(backend="openvino", shapes=one_row, openvino_streams="split"), config)
    assert "\n" not in str(error.value) and not (tmp_path / "one-row.xml").exists()
    built = build_engine(openvino_work / "model.int8.onnx", tmp_path / "auto.xml",
                         BuildOptions(backend="openvino", shapes=one_row), config)
    assert built.metadata.settings["streams"] == "single" and "streams_timing" not in built.metadata.checks


def test_int8_attention_is_refused_in_one_line_where_the_graph_records_none(openvino_work: Path, tmp_path: Path):
    from miaotui.engines import BuildOptions, build_engine
    from miaotui.models import resolve_config

    config = resolve_config("lstm-sentiment")
    for graph, expected in (("model.int8.onnx", "records no attention ranges"), ("model.opt.onnx", "is a fp32 graph")):
        with pytest.raises(InputError, match=f"--openvino-attention int8: .*{graph}.* {expected}"):
            build_engine(openvino_work / graph, tmp_path / "x.xml",
                         BuildOptions(backend="openvino", openvino_attention="int8"), config)
    assert not list(tmp_path.iterdir())  # nothing half-written
    # On a graph without attention, auto builds the float form without timing anything.
    built = build_engine(openvino_work / "model.int8.onnx", tmp_path / "auto.xml", BuildOptions(backend="openvino"),
                         config)
    assert built.metadata.settings["attention"] == "float" and "attention_timing" not in built.metadata.checks


def _lstm_runtime_precisions(engine: Path) -> list[str]:
    """The precision the CPU plugin runs each LSTM layer in, read from the compiled model."""
    import openvino

    compiled = openvino.Core().compile_model(str(engine), "CPU")
    return [op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
            if op.get_rt_info()["layerType"].astype(str) == "RNNSeq"]


def test_int8_lstm_runs_the_layer_in_int8_and_agrees_with_pytorch(openvino_work: Path, tmp_path: Path):
    """The LSTM, float in the QDQ graph, runs as one INT8 kernel: its input scaled into the hidden state's
    (-1, 1) by the embedding table's bound, W and R sharing each row's scale (quantized separately, as
    NNCF does, the kernel applies one set to both; with the input scaled, agreement fell to 0.72)."""
    import openvino

    from miaotui.engines import BuildOptions, build_engine
    from miaotui.engines.openvino_lstm import int8_lstm_candidates
    from miaotui.models import resolve_config
    from miaotui.stages import validate_engine

    config = resolve_config("lstm-sentiment")
    graph = openvino_work / "model.int8.onnx"
    [bound] = int8_lstm_candidates(openvino.convert_model(str(graph)))
    assert bound.source == "embedding table" and 1 < bound.bound < 100
    built = {form: build_engine(graph, tmp_path / f"{form}.xml", BuildOptions(backend="openvino", openvino_lstm=form),
                                config) for form in ("int8", "float")}
    assert built["int8"].metadata.settings["lstm"] == "int8" and built["int8"].metadata.settings["int8_lstm_layers"] == 1
    assert built["float"].metadata.settings["lstm"] == "float" and "lstm_timing" not in built["float"].metadata.checks
    assert _lstm_runtime_precisions(tmp_path / "int8.xml") == ["u8"]
    assert _lstm_runtime_precisions(tmp_path / "float.xml") != ["u8"]
    assert _fake_quantizes(tmp_path / "int8.xml") - _fake_quantizes(tmp_path / "float.xml") == 2  # X and H
    report = validate_engine(tmp_path / "int8.xml", config, openvino_work, progress=False)
    assert report.passed and report.outputs[0].top1_agreement >= 0.995, [c.sentence() for c in report.failures()]


def test_auto_keeps_int8_lstm_only_where_it_measured_faster(openvino_work: Path):
    from miaotui.engines import read_metadata
    from miaotui.engines.openvino_backend import LSTM_MIN_GAIN

    metadata = read_metadata(openvino_work / "engines" / "lstm-sentiment.openvino.int8.xml")  # built with auto
    timing = metadata.checks["lstm_timing"]
    faster = _int8_form_timed_faster(timing, LSTM_MIN_GAIN)
    assert metadata.settings["lstm"] == ("int8" if faster else "float")
    # Calls split across streams likewise, timed as the runtime runs the staged engine (where there are two CPUs)
    from miaotui.engines.openvino_backend import STREAMS_MIN_GAIN

    streams = metadata.checks.get("streams_timing")
    if _cpus() >= 2:
        shapes = [key for key in streams if key.startswith("ms_at_")]
        assert streams["streams"] == 2 and shapes == ["ms_at_opt", "ms_at_rows_32"]
        assert all(set(streams[key]) == {"single", "split", "split_to_single"} for key in shapes)
        ratio = float(np.prod([streams[key]["split_to_single"] for key in shapes]) ** 0.5)
        assert streams["split_to_single"] == pytest.approx(ratio, abs=1e-4) and streams["min_gain"] == STREAMS_MIN_GAIN
        split = ratio <= 1 - STREAMS_MIN_GAIN
        assert metadata.settings["streams"] == ("split" if split else "single")
        assert metadata.settings.get("split_from_rows") == (8 if split else None)  # the opt batch, the smallest timed
    # The FP32 graph's engine is left as the graph has it, and nothing is timed for it.
    fp32 = read_metadata(_engine(openvino_work))
    assert fp32.settings["lstm"] == "float" and "lstm_timing" not in fp32.checks


def test_int8_lstm_is_refused_in_one_line_where_it_cannot_be_built(openvino_work: Path, tiny_bert_work,
                                                                   tmp_path: Path):
    from miaotui.config import load_config
    from miaotui.engines import BuildOptions, build_engine
    from miaotui.models import resolve_config

    config_path, bert_work = tiny_bert_work
    cases = ((openvino_work / "model.opt.onnx", resolve_config("lstm-sentiment"), "is a fp32 graph"),
             (bert_work / "model.int8.onnx", load_config(config_path), "has no LSTM layer whose input has a known bound"))
    for graph, config, expected in cases:
        with pytest.raises(InputError, match=f"--openvino-lstm int8: .*{graph.name}.* {expected}"):
            build_engine(graph, tmp_path / "x.xml", BuildOptions(backend="openvino", openvino_lstm="int8"), config)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_another_lstms_hidden_states_are_bounded_its_cell_state_is_not():
    """A second LSTM reading the first one's hidden states (|H| < 1) may run in INT8 with bound 1; one
    reading its cell state (no bound) stays float."""
    import openvino
    from openvino import opset13 as ops

    from miaotui.engines.openvino_lstm import int8_lstm_candidates

    rng = np.random.default_rng(0)

    def constant(*shape):
        return ops.constant(rng.normal(size=shape).astype(np.float32))

    def lstm(x, inputs: int, steps: int):
        zeros = ops.constant(np.zeros((2, 1, 3), np.float32))
        return ops.lstm_sequence(x, zeros, zeros, ops.constant(np.full(2, steps, np.int32)), constant(1, 12, inputs),
                                 constant(1, 12, 3), constant(1, 12), 3, "forward")

    def stacked(output: int):
        ids = ops.parameter([2, 5], np.int64, name="ids")
        first = lstm(ops.gather(constant(10, 4), ids, ops.constant(np.int64(0))), 4, 5)
        second = lstm(first.output(output), 3, 1)  # Ho or Co, [2, 1, 3]: one step of 3 inputs
        return openvino.Model([second.output(0)], [ids])

    table, states = int8_lstm_candidates(stacked(1))
    assert table.source == "embedding table" and (states.source, states.bound) == ("LSTM states", 1.0)
    [table] = int8_lstm_candidates(stacked(2))
    assert table.source == "embedding table"


def test_calls_take_a_few_widths_and_rows_in_powers_of_two():
    from miaotui.engines.openvino_backend import OneTextForms
    from miaotui.engines.openvino_shapes import MAX_WIDTHS, padded_width, power_of_two_rows, width_step

    assert width_step(256) == 16 and width_step(128) == 16 and width_step(512) == 32
    for high in (128, 130, 256, 512):
        widths = {padded_width(width, width_step(high), 1, high) for width in range(1, high + 1)}
        assert len(widths) <= MAX_WIDTHS + 1 and max(widths) == high  # at most 16 steps, the last cut to the max
        assert all(padded_width(width, width_step(high), 1, high) >= width for width in range(1, high + 1))
    assert padded_width(37, 16, 1, 128) == 48 and padded_width(3, 16, 20, 128) == 20
    assert power_of_two_rows(21, 64) == [16, 4, 1] and power_of_two_rows(32, 64) == [32]
    assert power_of_two_rows(100, 64) == [64, 32, 4] and power_of_two_rows(100, 48) == [32, 32, 32, 4]
    assert all(sum(power_of_two_rows(rows, 64)) == rows for rows in range(1, 200))
    # The build times a few of those shapes; the rest are read off between them
    from miaotui.engines.openvino_shapes import CallCosts, call_costs_problem, cost_rows, cost_widths

    assert cost_rows(64) == [1, 2, 4, 8, 16, 32] and cost_rows(8) == [1, 2, 4, 8] and cost_rows(1) == [1]
    assert cost_widths(16, 1, 256) == [16, 32, 64, 128, 256] and cost_widths(16, 1, 130) == [16, 32, 64, 128, 130]
    assert cost_widths(32, 1, 512) == [32, 64, 128, 256, 512] and cost_widths(16, 20, 40) == [32, 40]
    costs = CallCosts((1, 2), (16, 64), ((2.0, 5.0), (4.0, 9.0)))
    assert costs.call_ms(1, 16) == 2.0 and costs.call_ms(1, 48) == pytest.approx(4.0)  # linear between widths
    assert costs.call_ms(4, 64) == pytest.approx(18.0)  # beyond the rows timed: in proportion
    assert costs.batch_ms(3, 64, limit=64) == pytest.approx(9.0 + 5.0)  # as Engine.run runs it: 2 rows, then 1
    assert costs.batch_ms(4, 16, limit=2) == pytest.approx(8.0)  # two calls of 2 under a limit of 2
    # Rows copied up to the next power of two where one call costs less than the slices (an LSTM's steps)
    cheap_rows = CallCosts((1, 2, 4), (16,), ((2.0,), (2.1,), (2.2,)))
    assert cheap_rows.calls(3, 16, limit=64) == [4] and cheap_rows.batch_ms(3, 16, limit=64) == pytest.approx(2.2)
    assert cheap_rows.calls(3, 16, limit=2) == [2, 1] and cheap_rows.calls(4, 16, limit=64) == [4]
    assert costs.calls(3, 64, limit=64) == [2, 1]  # 4 rows (18 ms) cost more than 2 + 1 (14)
    assert CallCosts.from_json(costs.to_json()) == costs and call_costs_problem(costs.to_json()) is None
    for table, problem in (([1, 2], "an object"), ({"rows": [1, 3], "widths": [16], "ms": [[1.0], [2.0]]}, "rows: powers"),
                           ({"rows": [1], "widths": [64, 16], "ms": [[1.0, 2.0]]}, "widths: ascending"),
                           ({"rows": [1], "widths": [16], "ms": [[0.0]]}, "ms: 1 lists of 1 positive"),
                           ({"rows": [1, 2], "widths": [16], "ms": [[1.0]]}, "ms: 2 lists")):
        assert call_costs_problem(table).startswith(problem), table
    forms = OneTextForms(16, 1, 130)
    one = lambda width, rows=1: {"input_ids": np.ones((rows, width), np.int64), "attention_mask": np.ones((rows, width), np.int64)}
    assert forms.fixed(one(48)) == 48 and forms.fixed(one(130)) == 130
    assert forms.fixed(one(37)) is None and forms.fixed(one(48, rows=2)) is None


def _tiny_bert_inputs(texts_tokens: list[int], width: int | None = None, seed: int = 3) -> dict[str, np.ndarray]:
    """Rows of random ids, each `tokens` long, padded (id 0, mask 0) to `width` or the longest."""
    width = width or max(texts_tokens)
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(texts_tokens), width), np.int64)
    mask = np.zeros_like(ids)
    for row, tokens in enumerate(texts_tokens):
        ids[row, :tokens] = rng.integers(5, 300, tokens)
        mask[row, :tokens] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_one_text_runs_on_a_model_compiled_for_its_padded_width(tiny_bert_work, tmp_path: Path):
    """One row at one of the fixed widths runs on a model compiled for [1, width] (compiled on its first
    call there, once); any other shape on the dynamic model. Padding is masked: the answer is the text's own
    up to rounding, and the same input always gets the same answer."""
    from miaotui.config import load_config
    from miaotui.engines import BuildOptions, build_engine
    from miaotui.engines.openvino_backend import BACKEND
    from miaotui.runtime import Engine

    config_path, work = tiny_bert_work
    config = load_config(config_path)
    built = {form: build_engine(work / "model.int8.onnx", tmp_path / f"{form}.xml",
                                BuildOptions(backend="openvino", openvino_one_text=form), config)
             for form in ("static", "dynamic")}
    static, dynamic = built["static"].metadata, built["dynamic"].metadata
    assert static.settings["one_text"] == "static"
    assert _session_beside_its_costs(static) == {"width_step": 16, "one_text_fixed": True}
    assert dynamic.settings["one_text"] == "dynamic"
    assert _session_beside_its_costs(dynamic) == {"width_step": 16, "one_text_fixed": False}
    assert static.checks["one_text_vs_onnxruntime_max_abs_diff"] < 0.1 and "one_text_timing" not in static.checks
    assert "(one text at fixed widths)" in BACKEND.describe(static)
    engine, plain = Engine.load(tmp_path / "static.xml", threads=2), Engine.load(tmp_path / "dynamic.xml", threads=2)
    assert engine.one_text_fixed and not plain.one_text_fixed
    assert engine.padded_width(37) == 48 and plain.padded_width(37) == 48  # both take a few widths
    runner = engine._backend
    text = _tiny_bert_inputs([37])
    padded = _tiny_bert_inputs([37], width=48)
    first = engine(**padded)["logits"]
    assert runner.fixed_widths == [48]
    np.testing.assert_array_equal(engine(**padded)["logits"], first)  # the same input, the same answer
    spread = float(np.ptp(plain(**_tiny_bert_inputs([37] * 16, seed=4))["logits"]))
    assert float(np.abs(first - plain(**text)["logits"]).max()) < 0.1 * spread  # the text's own answer
    engine(**text)  # width 37: the dynamic model
    engine(**_tiny_bert_inputs([30, 48]))  # two rows at width 48: the dynamic model
    assert runner.fixed_widths == [48]
    engine(**_tiny_bert_inputs([128]))
    assert runner.fixed_widths == [48, 128]
    assert engine.prepare_one_text() == list(range(16, 129, 16))  # a server's start: every width now
    assert runner.fixed_widths == list(range(16, 129, 16))
    assert plain.prepare_one_text() == []  # nothing to prepare
    # Rows in powers of two: 21 rows are three calls or one of 32 (the build's times say which; the tiny BERT's
    # time goes by its calls), answering like ONNX Runtime on the graph
    shapes = []
    run = plain._backend.run
    plain._backend.run = lambda arrays: shapes.append(arrays["input_ids"].shape) or run(arrays)
    rows = _tiny_bert_inputs(list(range(20, 41)), width=48)
    expected = ort.InferenceSession(str(work / "model.int8.onnx"), providers=["CPUExecutionProvider"]).run(None, rows)[0]
    answered = plain(**rows)["logits"]
    assert shapes == [(size, 48) for size in plain._call_costs.calls(21, 48, plain.max_batch)]
    assert shapes in ([(16, 48), (4, 48), (1, 48)], [(32, 48)]) and answered.shape == expected.shape
    assert float(np.abs(answered - expected).max()) < 0.1 * spread


def test_one_text_from_the_classifier_and_the_gate_at_fixed_widths(tiny_bert_work, tmp_path: Path):
    """Classifier.predict pads one text to the engine's width (a batch only to its longest); the gate judges
    every validation sample sent that way beside the batches, by the same bars."""
    from miaotui.config import load_config
    from miaotui.data.tokenizers import configure, load_tokenizer
    from miaotui.engines import BuildOptions, build_engine
    from miaotui.runtime import Classifier, Engine
    from miaotui.stages import validate_engine
    from miaotui.validation import write_reports

    config_path, work = tiny_bert_work
    config = load_config(config_path)
    build_engine(work / "model.int8.onnx", tmp_path / "static.xml",
                 BuildOptions(backend="openvino", openvino_one_text="static"), config)
    engine = Engine.load(tmp_path / "static.xml", threads=2)
    tokenizer = load_tokenizer(config.model.tokenizer)
    configure(tokenizer, 128)
    classifier = Classifier(engine, tokenizer, config.model.labels, "logits")
    texts = ["这本书写得很好，内容丰富，值得一读。", "太差了"]
    alone = [classifier.predict_with_logits(text)[1][0] for text in texts]
    lengths = [len(tokenizer.encode(text).ids) for text in texts]
    assert lengths[0] != lengths[1] and all(length % 16 for length in lengths)
    assert engine._backend.fixed_widths == sorted({engine.padded_width(length) for length in lengths})
    shapes = []
    run = engine._backend.run
    engine._backend.run = lambda arrays: shapes.append(arrays["input_ids"].shape) or run(arrays)
    together = classifier.predict_with_logits(texts)[1]
    np.testing.assert_allclose(np.stack(alone), together, atol=0.05)
    assert shapes and all(width % 16 == 0 and rows & (rows - 1) == 0 for rows, width in shapes)  # a few shapes
    # The batches follow the engine's own times per call shape: where one call costs the same whatever its
    # rows, texts of any lengths go in one call; where each row costs more in company, one text a call.
    from miaotui.engines.openvino_shapes import CallCosts

    assert engine.knows_call_costs and engine.batch_ms(3, 48) > 0
    mixed = ["好", "太差了，完全不值这个价钱", "一般般吧" * 12, "质量很好" * 30]
    rows_timed = (1, 2, 4, 8, 16, 32)
    for call_ms, calls in ((lambda rows: 5.0, 1), (lambda rows: float(rows * rows), len(mixed))):
        ms = tuple((call_ms(rows), call_ms(rows)) for rows in rows_timed)
        engine._call_costs, engine._batch_ms = CallCosts(rows_timed, (16, 128), ms), {}
        shapes.clear()
        classifier.predict(mixed)
        assert len(shapes) == calls, shapes
    from miaotui.cli import main

    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "static.xml")], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "ms a call as built (rows x tokens" in shown.output, shown.output
    assert "call_ms" not in shown.output and "'width_step': 16" in shown.output  # the table as a table
    report = validate_engine(tmp_path / "static.xml", config, work, progress=False)
    assert report.one_text is not None and report.one_text.output == "logits, one text a call"
    one_text_checks = [c for c in report.checks if c.output == "logits, one text a call"]
    assert {c.bar for c in one_text_checks} >= {"min_top1_agreement", "max_kl_divergence"}
    assert report.passed, [c.sentence() for c in report.failures()]
    markdown = write_reports(report, tmp_path / "reports")[1].read_text()
    assert "| metric | logits | logits, one text a call |" in markdown


def test_an_lstm_masking_padding_by_its_id_takes_padded_widths(openvino_work: Path):
    """lstm-sentiment has no mask input: it reads each text's state at its last real token and keeps padding
    (id 0) out of its max. The build checks that on the compiled model, then pads calls to a few widths like
    a masked model's: OpenVINO prepares and keeps every new call shape (2,400 calls of 1-8 rows by 4-128
    tokens: 100 -> 278 MiB resident at the widths as they came, 119 MiB padded)."""
    from miaotui.data.tokenizers import pad_to
    from miaotui.engines import read_metadata
    from miaotui.runtime import Engine

    path = openvino_work / "engines" / "lstm-sentiment.openvino.int8.xml"  # built with auto
    metadata = read_metadata(path)
    assert metadata.checks["padding_checked_with"] == "input_ids id 0" and "padded_widths_why_not" not in metadata.checks
    assert metadata.checks["padding_checked_at"][-1] == 256 and metadata.session["width_step"] == 16
    from miaotui.engines.backend import get_backend

    assert "(padding marked by input_ids id 0, checked)" in get_backend("openvino").describe(metadata)
    engine = Engine.load(path)
    assert engine.padded_width(37) == 48 and engine.knows_call_costs
    ids = _ids(3, 37)
    alone = engine.run({"input_ids": ids})["logits"]
    for width in (48, 256):
        np.testing.assert_allclose(engine.run(pad_to({"input_ids": ids}, width, 0))["logits"], alone, atol=1e-5)


def _lstm_config_padding_with(pad_id: int, folder: Path):
    """lstm-sentiment's config with a copy of its tokenizer that pads with `pad_id`."""
    from dataclasses import replace

    from miaotui.models import resolve_config

    config = resolve_config("lstm-sentiment")
    tokenizer = json.loads(Path(config.model.tokenizer).read_text())
    tokenizer["padding"]["pad_id"] = pad_id
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return replace(config, model=replace(config.model, tokenizer=str(folder / "tokenizer.json")))


def test_padded_widths_are_refused_where_padding_changes_the_answer(openvino_work: Path, tmp_path: Path):
    """A tokenizer that pads with a real character's id (7): padding would change the answer. Fixed widths
    are refused in one line naming it, auto pads nothing, and rows still run in powers of two, cut or copied
    up as the build's times say."""
    from miaotui.engines import BuildOptions, build_engine, read_metadata
    from miaotui.runtime import Engine

    (tmp_path / "tok").mkdir()
    config = _lstm_config_padding_with(7, tmp_path / "tok")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="--openvino-one-text static: .*model.int8.onnx cannot run one text at fixed "
                                         "widths: padding input_ids with the tokenizer's padding id 7 changed its "
                                         r"answer \(logits by .* tokens padded to .*\): it does not mask padding"):
        build_engine(openvino_work / "model.int8.onnx", out / "x.xml",
                     BuildOptions(backend="openvino", openvino_one_text="static"), config)
    assert not list(out.iterdir())  # nothing half-written
    build_engine(openvino_work / "model.int8.onnx", out / "x.xml", BuildOptions(backend="openvino"), config)
    metadata = read_metadata(out / "x.xml")
    assert metadata.settings["one_text"] == "dynamic" and "padding id 7" in metadata.checks["padded_widths_why_not"]
    assert metadata.checks["padding_checked_with"] == "input_ids id 7"  # what was checked
    assert set(metadata.session) == {"call_ms"}
    engine = Engine.load(out / "x.xml")
    assert engine.padded_width(37) == 37 and engine.width_step is None and engine.knows_call_costs
    ids = np.random.default_rng(5).integers(5, 3000, (21, 37))
    shapes, run = [], engine._backend.run
    engine._backend.run = lambda arrays: shapes.append(arrays["input_ids"].shape) or run(arrays)
    together = engine.run({"input_ids": ids})["logits"]
    assert shapes == [(rows, 37) for rows in engine._call_costs.calls(21, 37, engine.max_batch)]
    assert shapes in ([(16, 37), (4, 37), (1, 37)], [(32, 37)])
    halves = np.concatenate([run({"input_ids": ids[:10]})[0], run({"input_ids": ids[10:]})[0]])
    assert together.shape == (21, 2) and np.abs(together - halves).max() < 0.02
    # Copied up or cut, the rows answer alike: the table that says which, rewritten both ways
    from miaotui.engines.openvino_shapes import CallCosts

    for cheap_rows in (True, False):
        ms = tuple((1.0 + (0.01 if cheap_rows else 1.0) * rows,) * 2 for rows in (1, 2, 4, 8, 16, 32))
        engine._call_costs = CallCosts((1, 2, 4, 8, 16, 32), (16, 256), ms)
        shapes.clear()
        answered = engine.run({"input_ids": ids})["logits"]
        assert shapes == ([(32, 37)] if cheap_rows else [(16, 37), (4, 37), (1, 37)])
        assert np.abs(answered - halves).max() < 0.02


def test_the_served_text_model_answers_one_text_at_fixed_widths_like_the_classifier(tiny_bert_work, tmp_path: Path):
    """A real Triton server on the Python-backend text model of an openvino engine compiled for padded widths
    (the stub's own Python and openvino): it prepares every width before it says ready; single texts of
    several lengths, sent at once by several clients, and a batch of mixed lengths answer as
    Classifier.predict does here."""
    from concurrent.futures import ThreadPoolExecutor

    from miaotui.cli import main
    from miaotui.config import load_config
    from miaotui.engines import BuildOptions, build_engine
    from miaotui.runtime import Classifier
    from miaotui.serving.server import TritonServer, free_port

    from conftest import text_request, triton_server_missing

    if triton_server_missing():
        pytest.skip(f"no Triton server here: {triton_server_missing()}")
    config_path, work = tiny_bert_work
    config = load_config(config_path)
    served_work = tmp_path / "work"
    shutil.copytree(work, served_work)
    engine = served_work / "engines" / f"{config.name}.openvino.int8.xml"
    engine.parent.mkdir()
    built = build_engine(served_work / "model.int8.onnx", engine, BuildOptions(backend="openvino",
                                                                              openvino_one_text="static"), config)
    assert _session_beside_its_costs(built.metadata) == {"width_step": 16, "one_text_fixed": True}
    repository = tmp_path / "repo"
    result = CliRunner().invoke(main, ["package", str(served_work), "--triton", str(repository), "--backend", "openvino",
                                       "--precision", "int8", "--instances", "1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    name = f"{config.name}-text"
    texts = ["好", "太差了，完全不值这个价钱", "这本书写得很好，内容丰富，值得一读。物流也快，包装完好，下次还会再买。",
             "一般般吧" * 12, "质量很好" * 30]
    classifier = Classifier.load(served_work, backend="openvino", precision="int8")
    widths = {classifier.engine.padded_width(len(classifier.tokenizer.encode(text).ids)) for text in texts}
    assert len(widths) >= 4  # one text a call runs at several fixed widths
    alone = [classifier.predict_with_logits(text) for text in texts]
    together = classifier.predict_with_logits(texts)

    log = tmp_path / "tritonserver.log"
    server = TritonServer(repository, [name], http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          log_path=log)
    import tritonclient.http as http

    with server:
        def ask(batch: list[str]):
            client = http.InferenceServerClient(server.http_url)
            try:
                answer = client.infer(name, text_request(http, batch))
                return [v.decode() for v in answer.as_numpy("label").reshape(-1)], answer.as_numpy("logits")
            finally:
                client.close()

        one_by_one = [ask([text]) for text in texts]
        with ThreadPoolExecutor(len(texts)) as pool:
            at_once = list(pool.map(ask, [[text] for text in texts] * 3))
        batch_labels, batch_logits = ask(texts)
    assert server.process.returncode == 0, log.read_text()[-3000:]
    widths = ", ".join(map(str, range(16, 129, 16)))
    assert f"miaotui: {name}: {engine.name} on OpenVINO CPU" in log.read_text()
    assert f"one text at widths {widths} (a model each)" in log.read_text()  # all compiled before ready
    for (labels, logits), (expected, expected_logits) in zip(one_by_one, alone):
        assert labels == [expected[0].label]
        np.testing.assert_allclose(logits, expected_logits, atol=1e-5)  # the same model at the same width
    spread = float(np.ptp(np.concatenate([logits for _, logits in alone])))
    for (labels, logits), (expected, expected_logits) in zip(at_once, alone * 3):
        # the dynamic batcher may have put some together: padded then like a batch, close to alone
        assert float(np.abs(logits - expected_logits).max()) < 0.05 * spread
    assert batch_labels == [p.label for p in together[0]]
    np.testing.assert_allclose(batch_logits, together[1], atol=1e-5)
