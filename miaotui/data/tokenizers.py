"""Tokenizers in the `tokenizers` library's tokenizer.json format, for every built-in model.

The LSTM classifier reads characters: a WordLevel model over single characters (NFKC, lowercased,
whitespace dropped). Keeping it in tokenizer.json means the runtime loads it the same way as a
transformer's WordPiece tokenizer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from miaotui.errors import InputError

PAD_TOKEN, UNK_TOKEN = "[PAD]", "[UNK]"
# Padding tokens of the common vocabularies (WordPiece, BPE/SentencePiece), tried in order when the
# tokenizer.json does not configure padding itself (save_pretrained leaves it unset).
PAD_TOKENS = (PAD_TOKEN, "<pad>", "<PAD>")


def _char_pipeline(vocab: dict[str, int]):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    return tokenizer


def build_char_tokenizer(texts: Iterable[str], min_count: int, max_length: int):
    """A character vocabulary of the characters seen at least `min_count` times, [PAD]=0, [UNK]=1."""
    counter_source = _char_pipeline({PAD_TOKEN: 0, UNK_TOKEN: 1})
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = counter_source.normalizer.normalize_str(text)
        counts.update(ch for ch in normalized if not ch.isspace())
    kept = sorted((ch for ch, n in counts.items() if n >= min_count), key=lambda ch: (-counts[ch], ch))
    vocab = {PAD_TOKEN: 0, UNK_TOKEN: 1} | {ch: i + 2 for i, ch in enumerate(kept)}
    tokenizer = _char_pipeline(vocab)
    configure(tokenizer, max_length)
    return tokenizer


def configure(tokenizer, max_length: int):
    """Pad to the longest text of a call with the vocabulary's own padding token; truncate to `max_length`."""
    padding = tokenizer.padding
    if padding is not None:
        pad_token, pad_id = padding["pad_token"], padding["pad_id"]
    else:
        pad_token = next((token for token in PAD_TOKENS if tokenizer.token_to_id(token) is not None), PAD_TOKEN)
        pad_id = tokenizer.token_to_id(pad_token) or 0
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def load_tokenizer(path: str | Path, max_length: int | None = None):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: tokenizer file does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the library raises a bare Exception on malformed JSON
        raise InputError(f"{path}: not a tokenizer.json file ({error})") from error
    if max_length is not None:
        configure(tokenizer, max_length)
    return tokenizer


def vocab_size(path: str | Path) -> int:
    """The vocabulary size of a tokenizer.json, without building the tokenizer."""
    import json

    return len(json.loads(Path(path).read_text(encoding="utf-8"))["model"]["vocab"])


ENCODED = ("input_ids", "attention_mask", "token_type_ids")


def encode(tokenizer, texts: Sequence[str], pairs: Sequence[str] | None = None,
           names: Sequence[str] = ("input_ids", "attention_mask")) -> dict[str, np.ndarray]:
    """Right-padded int64 arrays `names` (of ENCODED) for a batch of texts, or of text pairs (the
    tokenizer's post-processor joins them and sets `token_type_ids`)."""
    given = list(texts) if pairs is None else list(zip(texts, pairs))
    encodings = tokenizer.encode_batch(given)
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    return {name: np.array([getattr(e, fields[name]) for e in encodings], dtype=np.int64) for name in names}


def padding_id(tokenizer) -> int:
    """The id the tokenizer pads input_ids with (0 where it has no padding set)."""
    return int(tokenizer.padding["pad_id"]) if tokenizer.padding else 0


def tokenizer_padding(config) -> int | None:
    """The padding id of a Config's tokenizer in input_ids (None for a model without one or without input_ids)."""
    if config.model.tokenizer and "input_ids" in config.inputs:
        return padding_id(load_tokenizer(config.model.tokenizer))
    return None


def pad_to(encoded: dict[str, np.ndarray], width: int, pad_id: int) -> dict[str, np.ndarray]:
    """`encoded`'s arrays right-padded to `width` columns with padding's own values: `pad_id` for
    input_ids, 0 for the mask and token types (an engine's profile may start above a text's length)."""
    extra = width - next(iter(encoded.values())).shape[1]
    if extra <= 0:
        return encoded
    return {name: np.pad(array, ((0, 0), (0, extra)), constant_values=pad_id if name == "input_ids" else 0)
            for name, array in encoded.items()}
