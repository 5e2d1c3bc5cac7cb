"""Feed dicts over the corpus splits, tokenized for a model: what [data] "module:function" yields."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np


def corpus_batches(
    split: str,
    tokenizer_path: Path,
    max_length: int,
    input_names: tuple[str, ...],
    batch_size: int = 32,
    with_labels: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of a corpus split in its stored order, holding the model's inputs (and `labels`)."""
    from miaotui.data.corpus import load_split
    from miaotui.data.tokenizers import encode, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path, max_length)
    examples = load_split(split)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        encoded = encode(tokenizer, [e.text for e in chunk])
        feed = {name: encoded[name] for name in input_names}
        if with_labels:
            feed["labels"] = np.array([e.label for e in chunk], dtype=np.int64)
        yield feed
