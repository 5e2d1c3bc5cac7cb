"""The default built-in model: real data, committed weights that reproduce, an export that matches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from miaotui.cli import main
from miaotui.data.corpus import SPLITS, corpus_dir, load_split, load_splits
from miaotui.data.tokenizers import encode, load_tokenizer
from miaotui.models import resolve_config
from miaotui.models.loading import load_model
from miaotui.models.lstm_sentiment import HERE, MAX_LENGTH

METRICS = json.loads((HERE / "metrics.json").read_text())


def test_splits_are_disjoint_deduplicated_and_cover_the_corpus():
    splits = load_splits()
    texts = [e.text for name in SPLITS for e in splits[name]]
    assert len(texts) == len(set(texts)), "a text must sit in exactly one split"
    neg = {l.strip() for l in (corpus_dir() / "neg.txt").open(encoding="utf-8") if l.strip()}
    pos = {l.strip() for l in (corpus_dir() / "pos.txt").open(encoding="utf-8") if l.strip()}
    assert set(texts) == (neg | pos) - (neg & pos)
    sizes = {name: len(splits[name]) for name in SPLITS}
    assert sizes["train"] > 0.75 * len(texts) and sizes["test"] > 0.08 * len(texts)
    assert load_split("test")[:5] == splits["test"][:5]  # stable order
    labels = {e.label for e in splits["test"]}
    assert labels == {0, 1}


def test_tokenizer_matches_the_config_range_and_pads_with_zero():
    config = resolve_config("lstm-sentiment")
    tokenizer = load_tokenizer(config.model.tokenizer, MAX_LENGTH)
    assert config.inputs["input_ids"].range == (0, tokenizer.get_vocab_size())
    assert tokenizer.token_to_id("[PAD]") == 0
    ids = encode(tokenizer, ["好书", "这本书很一般，不推荐购买"])["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (2, 12) and (ids[0, 2:] == 0).all()
    assert encode(tokenizer, ["长" * 1000])["input_ids"].shape == (1, MAX_LENGTH)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    config = resolve_config("lstm-sentiment")
    return config, load_model(config), load_tokenizer(config.model.tokenizer, MAX_LENGTH)


def test_committed_weights_give_the_reported_test_accuracy(model_and_tokenizer):
    config, model, tokenizer = model_and_tokenizer
    examples = load_split("test")
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(examples), 64):
            chunk = examples[start : start + 64]
            ids = torch.from_numpy(encode(tokenizer, [e.text for e in chunk])["input_ids"])
            correct += int((model(input_ids=ids).argmax(1) == torch.tensor([e.label for e in chunk])).sum())
    accuracy = correct / len(examples)
    assert accuracy == pytest.approx(METRICS["test_accuracy"], abs=0.003)
    assert accuracy >= 0.80
    assert sum(p.numel() for p in model.parameters()) == METRICS["parameters"]


def test_answer_does_not_depend_on_padding_in_the_batch(model_and_tokenizer):
    config, model, tokenizer = model_and_tokenizer
    texts = ["质量很好，物流也快", "太差了，完全不值这个价钱，以后再也不会买了，大家别上当"]
    with torch.inference_mode():
        alone = torch.cat([model(input_ids=torch.from_numpy(encode(tokenizer, [t])["input_ids"])) for t in texts])
        batched = model(input_ids=torch.from_numpy(encode(tokenizer, texts)["input_ids"]))
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)
    assert alone.argmax(1).tolist() == [1, 0]


def test_make_export_equivalent_writes_every_stage_and_a_summary(model_and_tokenizer, tmp_path: Path, monkeypatch):
    config, model, tokenizer = model_and_tokenizer
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "lstm-sentiment"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    onnx_path = tmp_path / "build" / "lstm-sentiment" / "model.onnx"
    assert onnx_path.is_file()
    assert "model.onnx" in result.stdout and "batch=8, seq=128" in result.stdout

    # Real text through the exported graph, padded batch: the same labels and logits as PyTorch.
    texts = [e.text for e in load_split("validation")[:48]]
    feed = {"input_ids": encode(tokenizer, texts)["input_ids"]}
    (logits,) = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feed)
    with torch.inference_mode():
        expected = model(input_ids=torch.from_numpy(feed["input_ids"])).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    assert (logits.argmax(1) == expected.argmax(1)).all()

    from tensorrt_judge import build_with_tensorrt_rtx

    assert build_with_tensorrt_rtx(onnx_path, config) > 1_000_000
    assert build_with_tensorrt_rtx(onnx_path.with_name("model.opt.onnx"), config) > 1_000_000

    # INT8: the head; the LSTM and the lookup feeding it say why not.
    report = json.loads((onnx_path.parent / "quantization.json").read_text())
    by_op = {d["op_type"]: d for d in report["decisions"]}
    assert by_op["Gemm"]["quantized"]
    assert not by_op["Gather"]["quantized"] and by_op["Gather"]["reason"] == "rule-gather-recurrent"
    assert not by_op["LSTM"]["quantized"] and by_op["LSTM"]["reason"] == "op-not-supported"
    assert "DynamicQuantizeLSTM" in by_op["LSTM"]["why"]
    assert report["agreement"]["samples"] == 886 and report["agreement"]["top1_agreement"] >= 0.99
    assert "top-1 agreement with FP32" in result.stdout
    int8 = onnx_path.with_name("model.int8.onnx")
    assert build_with_tensorrt_rtx(int8, config) > 1_000_000
    # With the looked-up rows in INT8, TensorRT-RTX 1.7 failed whenever the seq dim's minimum was above 1.
    from dataclasses import replace

    from miaotui.config import Dim
    from tensorrt_judge import PROFILES

    for batch_max, seq_min, seq_max in PROFILES:
        ranged = replace(config, dims={"batch": Dim("batch", 1, 1, batch_max), "seq": Dim("seq", seq_min, 64, seq_max)})
        assert build_with_tensorrt_rtx(int8, ranged) > 1_000_000

    # The engines: onnxruntime always, the TensorRT-RTX plan because [dev] installs that library, the
    # OpenVINO IR on x86-64 (openvino is in [dev] too); both CPU engines gated and timed.
    import platform

    engines = onnx_path.parent / "engines"
    openvino = platform.machine() in ("x86_64", "AMD64")
    assert sorted(p.name for p in engines.iterdir()) == [
        "lstm-sentiment.onnxruntime.int8.ort", "lstm-sentiment.onnxruntime.int8.ort.json",
        *(["lstm-sentiment.openvino.int8.bin", "lstm-sentiment.openvino.int8.xml",
           "lstm-sentiment.openvino.int8.xml.json"] if openvino else []),
        "lstm-sentiment.tensorrt-rtx.int8.plan", "lstm-sentiment.tensorrt-rtx.int8.plan.json"]
    assert "vs ONNX Runtime on the .onnx max |diff| 0e+00" in result.stdout
    if openvino:
        from miaotui.engines.choice import gate_timings

        assert all(gate_timings(onnx_path.parent, engine) is not None
                   for engine in engines.glob("*.int8.[ox][rm][tl]"))  # .ort and .xml

    again = CliRunner().invoke(main, ["run", "lstm-sentiment"], env={"COLUMNS": "200"})
    assert again.exit_code == 0 and again.stdout.count("cached") >= 5


def test_training_is_reproducible(tmp_path: Path):
    """One short epoch of `make train`: the same vocabulary as the committed one, loadable weights."""
    from safetensors.torch import load_file

    from miaotui.models.lstm_sentiment import build
    from miaotui.models.lstm_sentiment.train import main as train

    train(["--epochs", "1", "--max-train", "2000", "--out", str(tmp_path)])
    committed = json.loads((HERE / "tokenizer.json").read_text())["model"]["vocab"]
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"] == committed
    build().load_state_dict(load_file(str(tmp_path / "weights.safetensors")), strict=True)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.5 < metrics["test_accuracy"] <= 1.0


def test_every_export_in_one_process_keeps_the_sequence_dynamic(tmp_path: Path):
    """torch.onnx swaps in a while_loop LSTM decomposition per export; a stale dispatch cache once made
    the second export of an LSTM in a process unroll it and fix seq at the trace size (128)."""
    import onnx

    from miaotui.models import resolve_config
    from miaotui.stages import run_export_stage

    config = resolve_config("lstm-sentiment")
    for attempt in ("first", "second"):
        path = run_export_stage(config, tmp_path / attempt).path
        dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == ["batch", "seq"], attempt
