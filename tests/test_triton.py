"""`miaotui package WORK_DIR --triton REPO`: a model repository entry whose config.pbtxt Triton's own
schema (from tritonclient) parses, and whose model file answers like the engine it came from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from miaotui.cli import main
from miaotui.serving.model_config import parse, schema


def _package(*args: str):
    return CliRunner().invoke(main, ["package", *map(str, args)], env={"COLUMNS": "200"})


def _config(entry: Path):
    return parse((entry / "config.pbtxt").read_text(), str(entry))


def test_onnxruntime_engine_becomes_an_onnxruntime_model_that_answers_like_it(lstm_work: Path, tmp_path: Path):
    from miaotui.runtime import Engine

    repo = tmp_path / "repo"
    result = _package(lstm_work, "--triton", repo, "--backend", "onnxruntime", "--precision", "int8")
    assert result.exit_code == 0, result.output
    entry = repo / "lstm-sentiment"
    config = _config(entry)
    pb = schema()
    assert config.name == "lstm-sentiment" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64  # the engine's batch range is 1..64
    (ids,) = config.input
    assert ids.name == "input_ids" and ids.data_type == pb.TYPE_INT64 and list(ids.dims) == [-1]
    (logits,) = config.output
    assert logits.data_type == pb.TYPE_FP32 and list(logits.dims) == [2] and logits.label_filename == "labels.txt"
    assert (entry / "labels.txt").read_text().split() == ["negative", "positive"]
    sidecar = json.loads((entry / "engine.json").read_text())
    # The opt batch and the max batch, unless this machine's build found calls faster in row slices (as
    # lstm-sentiment's did on an AMD EPYC; test_an_engine_faster_in_row_slices_... pins that case): then
    # one slice's rows at the opt shape.
    split = sidecar["session"].get("max_call_elements")
    rows = min(64, split // int(np.prod(sidecar["inputs"][0]["opt"][1:]))) if split else 64
    assert list(config.dynamic_batching.preferred_batch_size) == sorted({min(8, rows), rows} - {1})
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, pb.ModelInstanceGroup.KIND_CPU)]
    assert sidecar["backend"] == "onnxruntime" and sidecar["precision"] == "int8"
    # Triton's onnxruntime backend runs model.onnx: it must answer like the engine that passed the gate.
    engine = Engine.load(lstm_work / "engines" / "lstm-sentiment.onnxruntime.int8.ort")
    ids_batch = np.random.default_rng(0).integers(1, 3651, (4, 30)).astype(np.int64)
    served = ort.InferenceSession(str(entry / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(served.run(None, {"input_ids": ids_batch})[0] - engine(input_ids=ids_batch)["logits"]).max() <= 1e-5
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_tensorrt_sidecar_becomes_a_tensorrt_plan_model(lstm_work: Path, tmp_path: Path):
    """A data-centre TensorRT engine's sidecar (TensorRT cannot build here: the plan bytes are
    TensorRT-RTX's, the sidecar says tensorrt, as `miaotui build --backend tensorrt` writes it)."""
    from miaotui.engines import BuildOptions, build_engine
    from miaotui.models import resolve_config

    work = tmp_path / "work"
    (work / "engines").mkdir(parents=True)
    shutil.copy(lstm_work / "config.toml", work / "config.toml")
    # Built beside, not into the shared work dir: other tests count on what its build stage has done.
    rtx = build_engine(lstm_work / "model.int8.onnx", tmp_path / "rtx.plan", BuildOptions(backend="tensorrt-rtx"),
                       resolve_config("lstm-sentiment"))
    plan = work / "engines" / "lstm-sentiment.tensorrt.int8.plan"
    shutil.copy(rtx.engine, plan)
    sidecar = json.loads(rtx.sidecar.read_text())
    sidecar |= {"backend": "tensorrt", "backend_version": "11.0.0", "engine_file": plan.name,
                "device": {"gpu": "NVIDIA H100", "compute_capability": "SM90"}}
    (work / "engines" / (plan.name + ".json")).write_text(json.dumps(sidecar))
    repo = tmp_path / "repo"
    result = _package(work, "--triton", repo, "--name", "sentiment", "--instances", "2", "--preferred-batch", "16,32",
                      "--max-queue-delay-us", "500")
    assert result.exit_code == 0, result.output
    entry = repo / "sentiment"
    config = _config(entry)
    pb = schema()
    assert config.name == "sentiment" and config.platform == "tensorrt_plan" and config.max_batch_size == 64
    assert (entry / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, pb.ModelInstanceGroup.KIND_GPU)]
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500

    again = _package(work, "--triton", repo, "--name", "sentiment")
    assert again.exit_code == 2 and "--force" in again.output
    assert _package(work, "--triton", repo, "--name", "sentiment", "--force").exit_code == 0
    assert list(_config(entry).dynamic_batching.preferred_batch_size) == [8, 64]


def test_an_engine_faster_in_row_slices_gets_the_slice_as_preferred_batch(lstm_work: Path, tmp_path: Path):
    """Triton's onnxruntime backend runs each formed batch in one call: where the build found calls of
    `max_call_elements` faster (the sidecar's session settings), the batcher is told to form those."""
    work = tmp_path / "work"
    (work / "engines").mkdir(parents=True)
    shutil.copy(lstm_work / "config.toml", work / "config.toml")
    engine = lstm_work / "engines" / "lstm-sentiment.onnxruntime.int8.ort"
    shutil.copy(engine, work / "engines" / engine.name)
    sidecar = json.loads((lstm_work / "engines" / (engine.name + ".json")).read_text())
    opt = sidecar["inputs"][0]["opt"]
    assert opt[0] == 8
    sidecar["session"] = sidecar.get("session", {}) | {"max_call_elements": 16 * int(np.prod(opt[1:]))}
    (work / "engines" / (engine.name + ".json")).write_text(json.dumps(sidecar))
    result = _package(work, "--triton", tmp_path / "repo")
    assert result.exit_code == 0, result.output
    config = _config(tmp_path / "repo" / "lstm-sentiment")
    assert config.max_batch_size == 64  # clients may still send up to the engine's largest batch
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]


def test_two_inputs_with_a_fixed_feature_dim(router: Path, tmp_path: Path):
    from miaotui.engines import BuildOptions
    from miaotui.stages import run_build_stage
    from miaotui.models import resolve_config

    config = resolve_config(router / "config.toml")
    run_build_stage(config, router / "work", BuildOptions(precision="fp32"), progress=False)
    result = _package(router / "work", "--triton", tmp_path / "repo")
    assert result.exit_code == 0, result.output
    model = _config(tmp_path / "repo" / "ticket-router")
    pb = schema()
    assert [(i.name, i.data_type, list(i.dims)) for i in model.input] == [
        ("tokens", pb.TYPE_INT64, [-1]), ("features", pb.TYPE_FP32, [4])]
    assert model.max_batch_size == 16 and list(model.output[0].dims) == [3]
    assert (tmp_path / "repo" / "ticket-router" / "labels.txt").read_text().split() == ["billing", "bug", "other"]


def _without_ranges(engine_json: dict) -> dict:
    return engine_json | {"inputs": [{k: v for k, v in i.items() if k not in ("min", "opt", "max")}
                                     for i in engine_json["inputs"]]}


@pytest.mark.parametrize("case", ["no engine", "no shape ranges", "empty inputs", "rtx plan", "damaged engine",
                                  "repo is a file", "engine threads"])
def test_bad_input_is_one_line_exit_2_and_leaves_the_repository_alone(lstm_work: Path, tmp_path: Path, case: str):
    work = tmp_path / "work"
    (work / "engines").mkdir(parents=True)
    shutil.copy(lstm_work / "config.toml", work / "config.toml")
    engine = lstm_work / "engines" / "lstm-sentiment.onnxruntime.int8.ort"
    target = work / "engines" / engine.name
    if case != "no engine":
        shutil.copy(engine, target)
        sidecar = json.loads((engine.parent / (engine.name + ".json")).read_text())
        if case == "no shape ranges":
            sidecar = _without_ranges(sidecar)
        elif case == "empty inputs":
            sidecar["inputs"] = []
        elif case == "rtx plan":
            target = target.with_name("lstm-sentiment.tensorrt-rtx.int8.plan")
            shutil.move(work / "engines" / engine.name, target)
            sidecar |= {"backend": "tensorrt-rtx", "engine_file": target.name}
        elif case == "damaged engine":
            target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
        (target.parent / (target.name + ".json")).write_text(json.dumps(sidecar))
    repo = tmp_path / "repo"
    if case == "repo is a file":
        repo.write_text("not a folder")
    result = _package(work, "--triton", repo, *(["--engine-threads", "0"] if case == "engine threads" else []))
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    expected = {"no engine": "no engine there", "no shape ranges": "inputs[0].min", "empty inputs": "shape ranges",
                "rtx plan": "TensorRT-RTX", "damaged engine": "sha256", "repo is a file": "not a folder",
                "engine threads": "--engine-threads 0: expected auto, default or a positive number"}[case]
    assert expected in message
    assert repo.is_file() if case == "repo is a file" else not repo.exists()
