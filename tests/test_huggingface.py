"""Hugging Face checkpoint folders and text data files: the path most users take.

Tiny random checkpoints of each supported family are made with save_pretrained (nothing is
downloaded); each goes through the whole pipeline from a CSV of corpus texts. Random weights prove
the plumbing (export equal to transformers, INT8 engine passing the gate, a TensorRT-RTX plan);
benchmarks/huggingface_finetune.py measures agreement on a trained one.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from miaotui.cli import main
from miaotui.data.corpus import LABELS, load_split
from miaotui.huggingface_folder import FAMILIES

from conftest import error_lines

pytest.importorskip("transformers")

TEXTS = ["这本书写得很好，推荐", "太差了，不推荐", "一般般吧", "物流很快，包装完好，会再买"]


def write_texts(path: Path, split: str, limit: int | None = None, label_names: bool = True) -> Path:
    examples = load_split(split)[:limit]
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["text", "label"])
        for example in examples:
            writer.writerow([example.text, LABELS[example.label] if label_names else example.label])
    return path


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("texts")
    write_texts(folder / "calibration.csv", "calibration", 256)
    write_texts(folder / "validation.csv", "validation", 300, label_names=False)
    return folder


def make_project(root: Path, family: str, corpus: Path) -> Path:
    from miaotui.models.huggingface_tiny import save_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_checkpoint(root / "checkpoint", family, [e.text for e in load_split("train")[:3000]], vocab_size=300)
    config = root / "config.toml"
    # `miaotui init` writes the config, as a user would start.
    result = CliRunner().invoke(main, ["init", str(root / "checkpoint"), "-o", str(config), "--calibration",
                                       str(corpus / "calibration.csv"), "--validation", str(corpus / "validation.csv")])
    assert result.exit_code == 0, result.output
    assert f"next: miaotui run {config}" in result.output and "TODO" not in result.output
    config.write_text(config.read_text().replace('name = "checkpoint"', f'name = "tiny-{family}"')
                      .replace("seq = { min = 1, opt = 128, max = 130 }", "seq = { min = 1, opt = 64, max = 128 }"))
    return config


def transformers_logits(folder: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_checkpoint_folder_and_csv_through_the_whole_pipeline(family: str, corpus_files: Path, tmp_path: Path):
    import onnxruntime as ort

    from miaotui.config import load_config
    from miaotui.data.tokenizers import encode, load_tokenizer
    from miaotui.runtime import Classifier

    config_path = make_project(tmp_path, family, corpus_files)
    config = load_config(config_path)
    takes_types = family in ("bert", "electra")  # the tiny RoBERTa family has one token type, DeBERTa none
    assert list(config.inputs) == ["input_ids", "attention_mask"] + (["token_type_ids"] if takes_types else [])
    assert config.model.labels == LABELS and config.model.tokenizer == tmp_path / "checkpoint" / "tokenizer.json"

    work = tmp_path / "work"
    result = CliRunner().invoke(main, ["run", str(config_path), "--out", str(work)])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output
    engines = sorted(p.name for p in (work / "engines").iterdir() if not p.name.endswith(".json"))
    assert f"tiny-{family}.onnxruntime.int8.ort" in engines
    assert f"tiny-{family}.tensorrt-rtx.int8.plan" in engines  # TensorRT-RTX parsed and built the INT8 graph
    # Both layers' self-attention found and its ranges recorded for INT8 attention (DeBERTa's disentangled
    # attention adds position terms to the scores: not the plain block, left in float).
    recorded = json.loads((work / "quantization.json").read_text())["attention"]["blocks"]
    assert recorded == (0 if family == "deberta-v2" else 2)
    # Every family's head reads the first token: the last layer runs on that row from its query on.
    optimized = json.loads((work / "manifest.json").read_text())["stages"]["optimize"]["details"]
    assert optimized["pooled_row_nodes"] >= 20  # 22 (DeBERTa 25) with transformers 5.25

    # The exported graph answers like transformers itself, padding included.
    tokenizer = load_tokenizer(config.model.tokenizer, 128)
    feed = encode(tokenizer, TEXTS, names=list(config.inputs))
    assert feed["attention_mask"].min() == 0  # the texts differ in length: some rows are padded
    onnx_logits = ort.InferenceSession(str(work / "model.onnx")).run(["logits"], feed)[0]
    expected = transformers_logits(tmp_path / "checkpoint", feed)
    np.testing.assert_allclose(onnx_logits, expected, atol=1e-4, rtol=0)

    # Text in, label out: the INT8 engine's Classifier agrees with the checkpoint's own argmax.
    predictions = Classifier.load(work, backend="onnxruntime").predict(TEXTS)
    assert [p.label for p in predictions] == [LABELS[i] for i in expected.argmax(axis=1)]


def test_factory_model_with_a_csv_and_a_tokenizer_needs_no_hand_tokenization(corpus_files: Path, tmp_path: Path):
    """A user's own module beside its config (importing a helper module beside it), a tokenizer.json,
    texts in a CSV; no `range` copied by hand: the tokenizer gives it."""
    from miaotui.data.tokenizers import build_char_tokenizer

    tokenizer = build_char_tokenizer((e.text for e in load_split("train")[:2000]), min_count=2, max_length=64)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    vocabulary = tokenizer.get_vocab_size()
    (tmp_path / "layers.py").write_text("import torch\nPOOL = torch.nn.AdaptiveAvgPool1d(1)\n")
    (tmp_path / "model.py").write_text(f'''
import torch
from layers import POOL


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding({vocabulary}, 32)
        self.head = torch.nn.Linear(32, 2)

    def forward(self, input_ids, attention_mask):
        hidden = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.head(POOL(hidden.transpose(1, 2)).squeeze(-1)), attention_mask.sum(dim=1)


def build():
    torch.manual_seed(0)
    return Classifier()
''')
    (tmp_path / "config.toml").write_text(f'''name = "own"
[model]
factory = "model.py:build"
tokenizer = "tokenizer.json"
labels = ["negative", "positive"]
outputs = ["logits"]
[inputs]
input_ids = {{ dtype = "int64", shape = ["batch", "seq"] }}
attention_mask = {{ dtype = "int64", shape = ["batch", "seq"], padding_mask = true }}
[dims]
batch = {{ min = 1, opt = 8, max = 32 }}
seq = {{ min = 1, opt = 32, max = 64 }}
[data]
calibration = "{corpus_files / "calibration.csv"}"
validation = "{corpus_files / "validation.csv"}"
''')
    work = tmp_path / "work"
    result = CliRunner().invoke(main, ["run", str(tmp_path / "config.toml"), "--out", str(work), "--backend",
                                       "onnxruntime"])
    assert result.exit_code == 0, result.output
    written = json.loads((work / "engines" / "own.onnxruntime.int8.ort.json").read_text())
    ids = next(t for t in written["inputs"] if t["name"] == "input_ids")
    assert ids["values"] == [0, vocabulary]  # the range came from the tokenizer
    import onnx

    assert [o.name for o in onnx.load(str(work / "model.onnx")).graph.output] == ["logits"]  # the named output only


def test_init_from_a_factory_reads_forward_and_marks_its_guesses(tmp_path: Path):
    (tmp_path / "net.py").write_text('''
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(9, 2)

    def forward(self, input_ids, attention_mask, price, scale=1.0):
        pooled = (self.embed(input_ids) * attention_mask.unsqueeze(-1)).mean(dim=1)
        return self.head(torch.cat([pooled, price], dim=-1)) * scale


def build():
    return Net()
''')
    config = tmp_path / "configs" / "net.toml"
    config.parent.mkdir()
    result = CliRunner().invoke(main, ["init", f"{tmp_path / 'net.py'}:build", "-o", str(config)])
    assert result.exit_code == 0, result.output
    assert "check the lines marked TODO" in result.output and f"next: miaotui run {config}" in result.output

    from miaotui.config import load_config

    loaded = load_config(config)  # loads as written: guesses are valid values
    assert list(loaded.inputs) == ["input_ids", "attention_mask", "price"]  # `scale` has a default: not an input
    assert loaded.model.factory == f"{tmp_path / 'net.py'}:build"  # written relative to the config's folder
    assert loaded.inputs["attention_mask"].padding_mask
    text = config.read_text()
    assert "range = [0, 30000] }  # TODO" in text and 'price = { dtype = "float32", shape = ["batch", 1] }  # TODO' in text
    again = CliRunner().invoke(main, ["init", f"{tmp_path / 'net.py'}:build", "-o", str(config)])
    assert again.exit_code == 2 and "exists; pass --force" in again.stderr


BAD_ROWS = {
    "missing text column": ("txt,label\nhello,positive\n", "no column 'text' (columns: 'txt', 'label')"),
    "unknown label": ("text,label\n很好,positive\n很差,neutral\n", ":3: column 'label': expected one of negative, positive"),
    "label out of range": ("text,label\n很好,1\n很差,2\n", ":3: column 'label': expected one of negative, positive or 0..1, got 2"),
    "empty text": ("text,label\n很好,1\n  ,0\n", ":3: column 'text' is empty"),
    "ragged row": ("text,label\n很好,1\n很差,0,extra\n", ":3: 3 fields, the header has 2"),
    "empty file": ("", "the file is empty"),
    "header only": ("text,label\n", "no rows of data"),
    "not utf-8": (b"text,label\n\xe5\xa5\xbd,1\n\xff\xfe,0\n", ":3: not UTF-8 (byte 0xff"),
    "jsonl not an object": ('{"text": "很好", "label": 1}\n[1, 2]\n', ":2: expected a JSON object per line, got list"),
    "jsonl bad json": ('{"text": "很好", "label": 1}\n{"text": \n', ":2: not a JSON object"),
    "jsonl text not a string": ('{"text": 5, "label": 1}\n', ":1: column 'text': expected a text, got 5"),
    "parquet not parquet": ("text,label\n很好,1\n", ": not a readable Parquet file"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_text_file_is_one_line_exit_2_and_nothing_written(case: str, tmp_path: Path):
    content, expected = BAD_ROWS[case]
    suffix = "." + case.split()[0] if case.split()[0] in ("jsonl", "parquet") else ".csv"
    data = tmp_path / f"texts{suffix}"
    data.write_bytes(content.encode() if isinstance(content, str) else content)
    config = tmp_path / "config.toml"
    config.write_text(f'''name = "lstm-texts"
[model]
factory = "miaotui.models.lstm_sentiment:build"
tokenizer = "{Path(__import__("miaotui.models.lstm_sentiment", fromlist=["x"]).__file__).parent / "tokenizer.json"}"
labels = ["negative", "positive"]
[inputs]
input_ids = {{ dtype = "int64", shape = ["batch", "seq"] }}
[dims]
batch = {{ min = 1, opt = 8, max = 32 }}
seq = {{ min = 1, opt = 32, max = 64 }}
[data]
calibration = "{data.name}"
''')
    out = tmp_path / "work"
    result = CliRunner().invoke(main, ["run", str(config), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert str(data) in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def minilm_text_config(folder: Path, calibration: str, seq_min: int = 1, validation: str | None = None):
    """The built-in minilm-sentiment config with text files for its data sets (names in `folder`)."""
    from miaotui.config import load_config

    package = Path(__import__("miaotui.models.minilm_sentiment", fromlist=["x"]).__file__).parent
    text = (package / "config.toml").read_text().replace('"tokenizer.json"', f'"{package / "tokenizer.json"}"')
    text = text.replace('"miaotui.models.minilm_sentiment:calibration_batches"', f'"{calibration}"')
    if validation:
        text = text.replace('"miaotui.models.minilm_sentiment:validation_batches"', f'"{validation}"')
    text = text.replace('seq = { min = 1,', f'seq = {{ min = {seq_min},')
    (folder / "config.toml").write_text(text)
    return load_config(folder / "config.toml")


def test_a_validation_text_file_is_batched_by_length_within_runs(tmp_path: Path):
    """A validation CSV (read whole by every stage) comes in batches of texts of alike length, ordered
    within runs of rows: every row once with its label, a run's rows in that run, each batch padded to
    its longest text and at least the seq dim's min, far fewer padded tokens than in file order. The
    calibration file keeps its order (a prefix of it is the calibration sample)."""
    from miaotui.data.datasets import data_set
    from miaotui.data.feeds import LENGTH_RUN_ROWS
    from miaotui.errors import InputError

    write_texts(tmp_path / "texts.csv", "validation", 300)
    config = minilm_text_config(tmp_path, "texts.csv", seq_min=8, validation="texts.csv")
    assert str(config.data.validation).endswith("texts.csv")

    def texts(batches):
        rows = []
        for feed in batches:
            assert feed["input_ids"].shape[1] >= 8
            assert feed["attention_mask"][:, -1].any() or feed["input_ids"].shape[1] == 8  # no padding-only column
            for ids, mask, label in zip(feed["input_ids"], feed["attention_mask"], feed["labels"]):
                length = int(mask.sum())
                assert mask[:length].all() and not mask[length:].any()
                rows.append((tuple(ids[:length]), int(label)))
        return rows

    validation, calibration = data_set(config, "validation"), data_set(config, "calibration")
    assert validation.by_length and not calibration.by_length
    grouped, stored = list(validation.batches()), list(calibration.batches())
    grouped_rows, stored_rows = texts(grouped), texts(stored)
    assert len(stored_rows) == 300 and sorted(grouped_rows) == sorted(stored_rows)
    assert [label for _, label in stored_rows] == [e.label for e in load_split("validation")[:300]]  # file order
    assert sorted(grouped_rows[:LENGTH_RUN_ROWS]) == sorted(stored_rows[:LENGTH_RUN_ROWS])
    lengths = [len(ids) for ids, _ in grouped_rows[:LENGTH_RUN_ROWS]]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    assert sum(f["input_ids"].size for f in grouped) < 0.6 * sum(f["input_ids"].size for f in stored)

    # a bad row inside a run still names its own line (a run is read and checked before any batch)
    lines = (tmp_path / "texts.csv").read_text(encoding="utf-8").splitlines()
    lines[199] = "很好,neutral"
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.csv:200: column 'label': expected one of negative, positive"):
        next(data_set(config, "validation", str(tmp_path / "bad.csv")).batches())


def test_text_files_of_each_format_give_the_same_batches(tmp_path: Path):
    """CSV, TSV, JSONL and Parquet of the same rows -> the same tokenized feeds and labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from miaotui.data.datasets import data_set

    examples = load_split("test")[:70]
    rows = [{"text": e.text, "label": LABELS[e.label]} for e in examples]
    with (tmp_path / "t.csv").open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    with (tmp_path / "t.tsv").open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, ["text", "label"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet", row_group_size=16)
    config = minilm_text_config(tmp_path, "t.csv", seq_min=40)

    def flat(suffix: str):
        batches = list(data_set(config, "calibration", str(tmp_path / f"t.{suffix}")).batches())
        return batches

    reference = flat("csv")
    assert sum(len(b["labels"]) for b in reference) == 70
    assert [int(x) for b in reference for x in b["labels"]] == [e.label for e in examples]
    assert min(b["input_ids"].shape[1] for b in reference) >= 40  # padded up to the seq dim's min
    assert all(b["input_ids"].shape[1] <= 256 for b in reference)
    for suffix in ("tsv", "jsonl", "parquet"):
        other = flat(suffix)
        assert len(other) == len(reference)
        for mine, theirs in zip(other, reference):
            assert mine.keys() == theirs.keys()
            for name in mine:
                np.testing.assert_array_equal(mine[name], theirs[name])


BAD_FOLDERS = {
    "no config.json": (lambda folder: (folder / "config.json").unlink(), "config.json is missing"),
    "pickled weights only": (lambda folder: (folder / "model.safetensors").rename(folder / "pytorch_model.bin"),
                             "found pytorch_model.bin: pickled weights are never loaded"),
    "unsupported family": (lambda folder: _edit_json(folder / "config.json", model_type="gpt2"),
                           "model_type 'gpt2' is not supported"),
    "no classification head": (lambda folder: _edit_json(folder / "config.json", architectures=["BertModel"]),
                               "has no *ForSequenceClassification head"),
}


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_checkpoint_folder_is_one_line(case: str, corpus_files: Path, tmp_path: Path):
    config = make_project(tmp_path, "bert", corpus_files)
    edit, expected = BAD_FOLDERS[case]
    edit(tmp_path / "checkpoint")
    out = tmp_path / "work"
    result = CliRunner().invoke(main, ["run", str(config), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not out.exists()
