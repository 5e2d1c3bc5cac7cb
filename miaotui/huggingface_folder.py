"""What a Hugging Face save_pretrained folder says about its classifier, read from its JSON files alone.

A config that names `[model] huggingface = "DIR"` gets its inputs, dims, labels, tokenizer and
outputs from here, so the folder is the whole model description. Only config.json and the file list
are read (no transformers, no torch): loading the weights is models/huggingface.py's job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from miaotui.errors import InputError

# model_type -> (family name in messages, takes token_type_ids, position ids start after the pad id).
# The encoder families whose sequence-classification heads export to plain ONNX ops (checked by
# tests/test_huggingface.py on tiny checkpoints of each).
FAMILIES = {
    "bert": ("BERT", True, False),
    "distilbert": ("DistilBERT", False, False),
    "roberta": ("RoBERTa", True, True),
    "xlm-roberta": ("XLM-RoBERTa", True, True),
    "camembert": ("CamemBERT", True, True),
    "electra": ("ELECTRA", True, False),
    "deberta-v2": ("DeBERTa-v2", True, False),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_BATCH = (1, 8, 64)  # min, opt, max of the batch dim unless [dims] says otherwise
DEFAULT_SEQ_OPT, DEFAULT_SEQ_MAX = 128, 512


@dataclass(frozen=True)
class HuggingFaceFolder:
    path: Path
    model_type: str
    vocab_size: int
    type_vocab_size: int  # token types the embedding has; 1 or 0: token_type_ids is not an input
    max_positions: int  # the longest sequence the position embeddings cover
    labels: tuple[str, ...]

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type][0]

    @property
    def tokenizer(self) -> Path | None:
        path = self.path / TOKENIZER_FILE
        return path if path.is_file() else None

    @property
    def input_names(self) -> tuple[str, ...]:
        takes_types = FAMILIES[self.model_type][1] and self.type_vocab_size > 1
        return ("input_ids", "attention_mask", "token_type_ids") if takes_types else ("input_ids", "attention_mask")

    def weight_files(self) -> list[Path]:
        """The files whose content is the model: config.json and the safetensors weights (the export's key)."""
        files = [self.path / "config.json"]
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            shards = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()
            files += [index] + sorted({self.path / shard for shard in shards})
        else:
            files.append(self.path / "model.safetensors")
        return files


def read_folder(path: Path, where: str) -> HuggingFaceFolder:
    """The folder's description, or InputError naming `where` (the config key) and what is wrong."""
    if not path.is_dir():
        raise InputError(f"{where}: {path} is not a folder (expected a save_pretrained folder with config.json)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InputError(f"{where}: {config_path} is missing (expected a save_pretrained folder)")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{config_path}: not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise InputError(f"{config_path}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise InputError(f"{config_path}: model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(FAMILIES)}); a factory (model.factory) exports any other torch module")
    architectures = raw.get("architectures") or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise InputError(f"{config_path}: architectures {architectures} has no *ForSequenceClassification head "
                         "(miaotui exports text classifiers)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        legacy = [name for name in ("pytorch_model.bin", "tf_model.h5") if (path / name).is_file()]
        hint = f" (found {legacy[0]}: pickled weights are never loaded; resave with save_pretrained(..., " \
               "safe_serialization=True))" if legacy else ""
        raise InputError(f"{where}: {path} has no model.safetensors{hint}")

    def number(key: str, default: int | None = None) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{config_path}: {key}: expected a non-negative integer, got {value!r}")
        return value

    max_positions = number("max_position_embeddings")
    if FAMILIES[model_type][2]:  # RoBERTa numbers positions from pad_token_id + 1
        max_positions -= number("pad_token_id", 1) + 1
    id2label = raw.get("id2label") or {}
    try:
        ordered = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError, AttributeError):
        raise InputError(f"{config_path}: id2label: expected {{\"0\": \"name\", ...}}, got {id2label!r}") from None
    if [k for k, _ in ordered] != list(range(len(ordered))) or len(ordered) < 2:
        raise InputError(f"{config_path}: id2label: expected labels for ids 0..N-1 (N >= 2), got {id2label!r}")
    labels = tuple(v for _, v in ordered)
    if len(set(labels)) != len(labels):
        raise InputError(f"{config_path}: id2label: label names must be unique, got {list(labels)}")
    return HuggingFaceFolder(path=path, model_type=model_type, vocab_size=number("vocab_size"),
                             type_vocab_size=number("type_vocab_size", 0), max_positions=max_positions,
                             labels=labels)


def default_dims(folder: HuggingFaceFolder) -> dict[str, tuple[int, int, int]]:
    """batch and seq as (min, opt, max): seq up to what the position embeddings cover (512 at most)."""
    seq_max = min(DEFAULT_SEQ_MAX, folder.max_positions)
    return {"batch": DEFAULT_BATCH, "seq": (1, min(DEFAULT_SEQ_OPT, seq_max), seq_max)}


def default_inputs(folder: HuggingFaceFolder) -> dict[str, dict]:
    """The config's [inputs] table as TOML data: token ids over the vocabulary, the mask, token types."""
    inputs = {"input_ids": {"dtype": "int64", "shape": ["batch", "seq"], "range": [0, folder.vocab_size]},
              "attention_mask": {"dtype": "int64", "shape": ["batch", "seq"], "range": [0, 2], "padding_mask": True}}
    if "token_type_ids" in folder.input_names:
        inputs["token_type_ids"] = {"dtype": "int64", "shape": ["batch", "seq"], "range": [0, folder.type_vocab_size]}
    return inputs
