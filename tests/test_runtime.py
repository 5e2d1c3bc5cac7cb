"""The runtime: Engine.load() answers like ONNX Runtime on the same file, checks every input, splits
big batches, is safe under threads, refuses damaged or foreign engines; Classifier turns texts into
labels."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import DATA, write_custom_config, write_data

from miaotui.config import load_config
from miaotui.cuda import no_gpu_reason
from miaotui.data.corpus import load_split
from miaotui.engines import BuildOptions, build_engine, sidecar_path
from miaotui.stages import run_build_stage
from miaotui.errors import InputError
from miaotui.models import resolve_config
from miaotui.runtime import Classifier, Engine


@pytest.fixture(scope="module")
def lstm_engine(lstm_work: Path) -> Path:
    return lstm_work / "engines" / "lstm-sentiment.onnxruntime.int8.ort"


def _ids(rows: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 3000, (rows, seq), dtype=np.int64)


def _plain_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.load_model_format", "ORT")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_engine_equals_a_plain_onnxruntime_session_and_splits_big_batches(lstm_engine: Path):
    engine = Engine.load(lstm_engine, threads=1)
    assert [t.name for t in engine.inputs] == ["input_ids"] and [o.name for o in engine.outputs] == ["logits"]
    assert engine.provider == "CPUExecutionProvider" and engine.max_batch == 64
    plain = _plain_session(lstm_engine)
    ids = _ids(150, 40)  # more rows than the engine's max batch of 64
    expected = np.concatenate([plain.run(None, {"input_ids": ids[i:i + 64]})[0] for i in range(0, 150, 64)])
    np.testing.assert_array_equal(engine(input_ids=ids)["logits"], expected)
    np.testing.assert_allclose(engine.run({"input_ids": ids}, batch_size=7)["logits"], expected, atol=1e-5, rtol=0)
    one = engine(input_ids=ids[:1])["logits"]
    np.testing.assert_array_equal(one, plain.run(None, {"input_ids": ids[:1]})[0])


def test_torch_in_torch_out(lstm_engine: Path):
    torch = pytest.importorskip("torch")
    engine = Engine.load(lstm_engine)
    ids = _ids(5, 12)
    logits = engine(input_ids=torch.from_numpy(ids))["logits"]
    assert isinstance(logits, torch.Tensor) and logits.device.type == "cpu"
    np.testing.assert_array_equal(logits.numpy(), engine(input_ids=ids)["logits"])


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_eight_threads_get_exactly_the_single_thread_answers_and_memory_stays_flat(lstm_engine: Path):
    engine = Engine.load(lstm_engine, threads=1)
    sizes = [1, 3, 8, 17, 64, 100]  # 100 > max batch: split inside the call
    feeds = [_ids(size, 8 + 5 * index, seed=index) for index, size in enumerate(sizes)]
    expected = [engine(input_ids=feed)["logits"] for feed in feeds]
    errors: list[BaseException] = []
    mismatches = []

    def worker(offset: int, calls: int) -> None:
        try:
            for call in range(calls):
                index = (call + offset) % len(feeds)
                if not np.array_equal(engine(input_ids=feeds[index])["logits"], expected[index]):
                    mismatches.append((offset, call))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    def run_threads(calls: int) -> None:
        threads = [threading.Thread(target=worker, args=(offset, calls)) for offset in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run_threads(60)  # ONNX Runtime's arenas grow to 8 concurrent calls' worth, once
    before = _rss_mib()
    run_threads(500)
    assert not errors and not mismatches
    assert _rss_mib() - before < 32, f"resident memory grew {before:.0f} -> {_rss_mib():.0f} MiB over 4,000 calls"


BAD_CALLS = {
    "missing": ({}, "missing input 'input_ids': the engine takes input_ids"),
    "unknown": ({"input_ids": _ids(2, 5), "mask": _ids(2, 5)}, "unknown input 'mask'"),
    "dtype": ({"input_ids": _ids(2, 5).astype(np.int32)}, "input 'input_ids': dtype int32, the engine takes int64"),
    "rank": ({"input_ids": _ids(2, 5)[0]}, "has rank 1, the engine takes rank 2 (1x1 .. 64x256)"),
    "too long": ({"input_ids": _ids(2, 300)}, "dim 1 is 300, the engine takes 1..256 there"),
    "empty batch": ({"input_ids": _ids(2, 5)[:0]}, "empty batch"),
    "not an array": ({"input_ids": [[1, 2, 3]]}, "got list, expected a numpy array or torch tensor of int64"),
    "negative id": ({"input_ids": np.array([[5, 6, -1]])}, "value -1 at [0, 2] is outside [0, 3651)"),
    "id past the vocabulary": ({"input_ids": np.array([[5, 3651]])}, "value 3651 at [0, 1] is outside [0, 3651)"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_inputs_name_the_tensor_and_what_the_engine_takes(lstm_engine: Path, case: str):
    feed, message = BAD_CALLS[case]
    engine = Engine.load(lstm_engine)
    with pytest.raises(InputError) as error:
        engine.run(feed)
    assert message in str(error.value)


def test_inputs_that_disagree_on_the_batch_are_refused(custom_model_dir: Path, tmp_path: Path):
    write_custom_config(custom_model_dir, DATA)
    write_data(custom_model_dir)
    config = load_config(custom_model_dir / "config.toml")
    built = run_build_stage(config, tmp_path / "work", BuildOptions(backend="onnxruntime", precision="fp32"), progress=False)
    engine = Engine.load(built.path)
    tokens = np.ones((3, 6), np.int64)
    with pytest.raises(InputError, match="inputs disagree on the batch size: tokens 3, features 2"):
        engine(tokens=tokens, features=np.zeros((2, 4), np.float32))
    with pytest.raises(InputError, match="dim 1 is 5, the engine takes 4..4"):
        engine(tokens=tokens, features=np.zeros((3, 5), np.float32))
    scores = engine(tokens=tokens, features=np.zeros((3, 4), np.float32))["scores"]
    plain = _plain_session(built.path).run(None, {"tokens": tokens, "features": np.zeros((3, 4), np.float32)})[0]
    np.testing.assert_array_equal(scores, plain)


def _copy_engine(source: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    target = folder / source.name
    target.write_bytes(source.read_bytes())
    sidecar_path(target).write_bytes(sidecar_path(source).read_bytes())
    return target


def _edit_sidecar(engine: Path, **changes) -> None:
    data = json.loads(sidecar_path(engine).read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[key] = value
    sidecar_path(engine).write_text(json.dumps(data))


def test_damaged_missing_or_foreign_engines_are_one_clear_error(lstm_engine: Path, tmp_path: Path):
    def refused(engine: Path, message: str) -> None:
        with pytest.raises(InputError) as error:
            Engine.load(engine)
        assert message in str(error.value) and "\n" not in str(error.value)

    truncated = _copy_engine(lstm_engine, tmp_path / "truncated")
    truncated.write_bytes(truncated.read_bytes()[:5000])
    refused(truncated, "truncated, damaged or replaced")

    flipped = _copy_engine(lstm_engine, tmp_path / "flipped")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    refused(flipped, "sha256 differs")

    # A corrupt file whose sidecar was rewritten to match it: the backend itself refuses, no crash.
    from miaotui.artifacts import sha256_file

    garbage = _copy_engine(lstm_engine, tmp_path / "garbage")
    garbage.write_bytes(b"\x00garbage" * 1000)
    _edit_sidecar(garbage, engine_sha256=sha256_file(garbage), engine_bytes=garbage.stat().st_size)
    refused(garbage, "ONNX Runtime cannot load this engine")

    newer = _copy_engine(lstm_engine, tmp_path / "newer")
    _edit_sidecar(newer, backend_version="99.0.0")
    refused(newer, "built with onnxruntime 99.0.0")

    other_cpu = _copy_engine(lstm_engine, tmp_path / "cpu")
    _edit_sidecar(other_cpu, device__isa=["asimd", "sve"] if "x86" in os.uname().machine else ["avx512_vnni", "amx_int8"])
    refused(other_cpu, "which this CPU lacks")

    lonely = _copy_engine(lstm_engine, tmp_path / "lonely")
    sidecar_path(lonely).unlink()
    refused(lonely, "sidecar is missing")

    # What the build measured for the runtime (call sizes, widths): a wrong type is refused on load, not a
    # traceback on the first call.
    for index, (key, value) in enumerate((("width_step", "16"), ("max_call_elements", 0), ("one_text_fixed", "yes"),
                                          ("providers", "CPUExecutionProvider"),
                                          ("call_ms", {"rows": [1, 2], "widths": [16], "ms": [[1.5], ["2"]]}))):
        edited = _copy_engine(lstm_engine, tmp_path / f"session{index}")
        data = json.loads(sidecar_path(edited).read_text())
        data["session"] = data.get("session", {}) | {key: value}
        sidecar_path(edited).write_text(json.dumps(data))
        refused(edited, f"key 'session.{key}' should be a ")

    broken = _copy_engine(lstm_engine, tmp_path / "broken")
    sidecar_path(broken).write_text('{"format": 1, "backend": "onnxruntime"}')
    refused(broken, "key 'inputs' is missing")
    refused(tmp_path / "absent.ort", "engine file does not exist")


def test_a_tensorrt_plan_on_a_machine_without_a_gpu_says_so(lstm_work: Path, tmp_path: Path):
    if not (reason := no_gpu_reason()):
        pytest.skip("this machine has a GPU")
    plan = tmp_path / "lstm.plan"
    build_engine(lstm_work / "model.int8.onnx", plan, BuildOptions(backend="tensorrt-rtx"), resolve_config("lstm-sentiment"))
    with pytest.raises(InputError, match=re.escape(f"a tensorrt-rtx plan runs on an NVIDIA GPU, and {reason}")):
        Engine.load(plan)


def test_the_runtime_needs_neither_torch_nor_onnx_nor_export(lstm_engine: Path):
    code = f"""
import sys, numpy as np
from miaotui.runtime import Engine, Classifier
engine = Engine.load({str(lstm_engine)!r})
engine(input_ids=np.ones((2, 5), np.int64))
Classifier.load({str(lstm_engine.parent.parent)!r}).predict(["好"])
loaded = [m for m in sys.modules if m in ("torch", "onnx") or m.startswith("miaotui.export")]
assert not loaded, loaded
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_onnxruntime_engines_stop_spinning_between_calls_once_a_second_one_is_loaded(lstm_engine: Path,
                                                                                      tmp_path: Path):
    # In a process of its own: the rule counts every onnxruntime engine alive in the process.
    copy = tmp_path / lstm_engine.name
    copy.write_bytes(lstm_engine.read_bytes())
    sidecar_path(copy).write_bytes(sidecar_path(lstm_engine).read_bytes())
    code = f"""
import gc, json, pathlib, numpy as np
from miaotui.runtime import Engine

def stops(engine):
    try:
        return engine._backend.session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
    except RuntimeError:  # ONNX Runtime: no such entry, its default (spin on)
        return False

ids = np.random.default_rng(0).integers(1, 3000, (3, 17))
first = Engine.load({str(lstm_engine)!r}, threads=1)
alone = stops(first), first.run({{"input_ids": ids}})["logits"]
second = Engine.load({str(lstm_engine)!r}, threads=1)
shared = [stops(first), stops(second)]
same = bool(np.array_equal(first.run({{"input_ids": ids}})["logits"], alone[1]))
del first, second
gc.collect()
third = Engine.load({str(lstm_engine)!r}, threads=1)
alone_again = stops(third)
del third
gc.collect()
# a file replaced after its engine was loaded is never reopened: that engine keeps its session
replaced = Engine.load({str(copy)!r}, threads=1)
pathlib.Path({str(copy)!r}).write_bytes(pathlib.Path({str(copy)!r}).read_bytes() + bytes(8))  # still loads
fourth = Engine.load({str(lstm_engine)!r}, threads=1)
kept = [stops(replaced), stops(fourth)]
kept_same = bool(np.array_equal(replaced.run({{"input_ids": ids}})["logits"], alone[1]))
print(json.dumps({{"alone": alone[0], "shared": shared, "same": same, "alone_again": alone_again, "kept": kept,
                  "kept_same": kept_same}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts == {"alone": False, "shared": [True, True], "same": True, "alone_again": False,
                     "kept": [False, True], "kept_same": True}


def test_classifier_predicts_labels_in_order_like_the_engine(lstm_work: Path):
    classifier = Classifier.load(lstm_work)
    assert classifier.engine.backend == "onnxruntime" and classifier.labels == ["negative", "positive"]
    examples = load_split("test")[:200]
    texts = [e.text for e in examples] + ["好" * 1000]  # one beyond the engine's longest sequence
    predictions = classifier.predict(texts, batch_size=16)
    assert len(predictions) == len(texts)
    assert all(p.label in ("negative", "positive") and 0.5 <= p.score <= 1 for p in predictions)
    accuracy = np.mean([p.index == e.label for p, e in zip(predictions, examples)])
    assert accuracy > 0.78  # the INT8 engine keeps the model's ~0.82
    # One at a time (no padding, no sorting) gives the same labels: batching is invisible.
    alone = [classifier.predict(text)[0] for text in texts[:30]]
    assert [p.index for p in alone] == [p.index for p in predictions[:30]]
    assert all(abs(a.score - b.score) < 1e-4 for a, b in zip(alone, predictions[:30]))
    same = Classifier.load(classifier.engine.path)  # an engine file inside a work dir works too
    assert [p.label for p in same.predict(texts[:10])] == [p.label for p in predictions[:10]]
    # Nothing to classify, or not text: one line naming the position, not a confident label or a TypeError.
    for bad, message in (("  ", "texts[1] is empty"), ("好\ud800", "texts[1]: not valid Unicode at character 1"),
                         (3, "texts[1]: got int")):
        with pytest.raises(InputError, match=re.escape(message)):
            classifier.predict(["好", bad])


def test_cli_predict_prints_a_table_and_refuses_a_dir_without_engines(lstm_work: Path, tmp_path: Path):
    env = dict(os.environ, COLUMNS="200")
    result = subprocess.run([sys.executable, "-m", "miaotui.cli", "predict", str(lstm_work), "这是一个示例文本", "质量很好，物流也快"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "质量很好，物流也快" in result.stdout and "positive" in result.stdout and "CPUExecutionProvider" in result.stdout
    (tmp_path / "engines").mkdir()
    (tmp_path / "config.toml").write_text((lstm_work / "config.toml").read_text())
    empty = subprocess.run([sys.executable, "-m", "miaotui.cli", "predict", str(tmp_path), "x"], capture_output=True, text=True)
    assert empty.returncode == 2 and "no engine there" in empty.stderr and len(empty.stderr.strip().splitlines()) == 1


def _gpu_plan(lstm_work: Path, tmp_path: Path) -> Path:
    """lstm-sentiment's INT8 TensorRT-RTX plan for this machine's GPU (the test skips without one)."""
    if reason := no_gpu_reason():
        pytest.skip(f"running a plan needs a CUDA GPU: {reason}")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    from miaotui.cuda import cuda_devices
    from miaotui.engines import TensorRTOptions

    plan = tmp_path / "lstm.plan"
    options = BuildOptions(backend="tensorrt-rtx", tensorrt=TensorRTOptions(compute_capabilities=(cuda_devices()[0].compute_capability,)))
    build_engine(lstm_work / "model.int8.onnx", plan, options, resolve_config("lstm-sentiment"))
    return plan


@pytest.mark.gpu
def test_tensorrt_rtx_plan_runs_like_onnxruntime_on_a_gpu(lstm_work: Path, tmp_path: Path):
    import torch

    engine = Engine.load(_gpu_plan(lstm_work, tmp_path))
    ids = _ids(100, 30)
    on_gpu = engine(input_ids=torch.from_numpy(ids).cuda())["logits"]
    assert on_gpu.is_cuda  # CUDA tensors stay on the GPU
    reference = Engine.load(lstm_work / "engines" / "lstm-sentiment.onnxruntime.int8.ort")(input_ids=ids)["logits"]
    assert (on_gpu.cpu().numpy().argmax(1) == reference.argmax(1)).mean() >= 0.99


@pytest.mark.gpu
def test_a_tensorrt_sidecar_that_disagrees_with_its_plan_is_refused(lstm_work: Path, tmp_path: Path):
    plan = _gpu_plan(lstm_work, tmp_path)
    Engine.load(plan)  # the untouched sidecar agrees
    for key, value, message in (("name", "ids", "the sidecar names inputs ids, the engine takes input_ids"),
                                ("max", [64, 100000], "dim 1 is 1..100000, the engine takes 1..256")):
        data = json.loads(sidecar_path(plan).read_text())
        original = json.dumps(data)
        data["inputs"][0][key] = value
        sidecar_path(plan).write_text(json.dumps(data))
        with pytest.raises(InputError, match=message):
            Engine.load(plan)
        sidecar_path(plan).write_text(original)


def test_the_readme_runtime_example_runs_as_written(lstm_work: Path, tmp_path: Path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Runtime: serve an engine", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "lstm-sentiment").symlink_to(lstm_work)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(100, 2)" in result.stdout and "Prediction(label='positive'" in result.stdout


def test_a_sidecar_that_disagrees_with_its_engine_is_refused(lstm_engine: Path, tmp_path: Path):
    def refused(changes: dict, message: str) -> None:
        engine = _copy_engine(lstm_engine, tmp_path / str(len(list(tmp_path.iterdir()))))
        data = json.loads(sidecar_path(engine).read_text())
        for key, value in changes.items():
            section, index, field = key.split(".")
            data[section][int(index)][field] = value
        sidecar_path(engine).write_text(json.dumps(data))
        with pytest.raises(InputError) as error:
            Engine.load(engine)
        assert message in str(error.value) and "sidecar was edited" in str(error.value) and "\n" not in str(error.value)

    refused({"inputs.0.name": "ids"}, "the sidecar names inputs ids, the engine takes input_ids")
    refused({"inputs.0.dtype": "int32"}, "the sidecar says input 'input_ids' is int32 of rank 2, the engine takes int64")
    refused({"inputs.0.min": [1, 1, 1], "inputs.0.opt": [8, 128, 1], "inputs.0.max": [64, 256, 1]}, "of rank 3")
    refused({"outputs.0.dtype": "float16"}, "output 'logits' is float16, the engine gives float32")


def test_batches_are_cut_by_padded_cost():
    from miaotui.runtime.classifier import batches_by_cost

    def cut(lengths, max_batch=64):
        batches = batches_by_cost(lengths, max_batch)
        assert [i for b in batches for i in range(len(lengths))[b]] == list(range(len(lengths)))  # all, in order
        assert all(b.stop - b.start <= max_batch for b in batches)
        return [b.stop - b.start for b in batches]

    assert cut([20] * 40) == [40]  # alike: one call
    assert len(cut([20] * 100)) == 2  # no more calls than the engine's largest batch makes necessary
    assert cut([5] * 30 + [250, 256]) == [30, 2]  # two long texts would pad thirty short ones 50-fold
    assert cut([10, 11, 12, 13]) == [4]  # small differences are not worth a call
    assert cut([]) == []
    # Priced by the engine's own times per call shape where it has them (Engine.batch_ms)
    lengths = [5] * 30 + [250, 256]
    assert [b.stop - b.start for b in batches_by_cost(lengths, 64, call_cost=lambda rows, longest: 1e6 + rows)] == [32]
    alone = batches_by_cost(lengths, 64, call_cost=lambda rows, longest: rows * rows * longest)  # company costs
    assert [b.stop - b.start for b in alone] == [1] * 32


def test_instances_divide_the_cpus_among_them():
    from miaotui.runtime.instances import instance_threads

    assert instance_threads("auto", 1, cpus=8) is None  # one instance: the engine's own default
    assert [instance_threads("auto", n, cpus=8) for n in (2, 3, 4, 8, 16)] == [4, 2, 2, 1, 1]
    assert instance_threads("default", 4, cpus=8) is None
    assert instance_threads("3", 4, cpus=8) == 3
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ValueError, match="expected auto, default or a positive number"):
            instance_threads(bad, 2, cpus=8)
