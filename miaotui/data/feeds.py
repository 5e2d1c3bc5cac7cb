"""Feed dicts over the corpus splits, tokenized for a model: what [data] "module:function" yields."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

# With `by_length`, texts are ordered by token count within each run of this many (a multiple of the
# batch size), so a batch pads to a length its texts share: on minilm's validation split 2.4x fewer
# padded tokens than batches in stored order (3.4x less attention work), where only 33% were real.
# Runs, not the whole split: each run of the stream holds the stored rows of that run. A prefix
# shorter than a run is its shortest texts: who samples a set takes rows spread over it
# (datasets.spread_rows).
LENGTH_RUN_ROWS = 256


def run_rows(batch_size: int, by_length: bool) -> int:
    """How many texts to read and tokenize at once: a batch, or with `by_length` the whole batches
    that cover LENGTH_RUN_ROWS (a run cut into batches leaves no short batch but its last)."""
    return -(-LENGTH_RUN_ROWS // batch_size) * batch_size if by_length else batch_size


def trimmed_batches(encoded: dict[str, np.ndarray], names, batch_size: int,
                    by_length: bool) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """A run's right-padded arrays (with `attention_mask`, which counts each row's real tokens) cut
    into batches: in stored order, or with `by_length` by token count (stable). Yields each batch's
    row indices and its arrays `names`, trimmed to its longest text."""
    lengths = encoded["attention_mask"].sum(axis=1)
    order = np.argsort(lengths, kind="stable") if by_length else np.arange(len(lengths))
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        width = max(int(lengths[rows].max()), 1)  # right padding: the columns past it are padding only
        yield rows, {name: encoded[name][rows, :width] for name in names}


def corpus_batches(
    split: str,
    tokenizer_path: Path,
    max_length: int,
    input_names: tuple[str, ...],
    batch_size: int = 32,
    with_labels: bool = False,
    by_length: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of a corpus split holding the model's inputs (and `labels`), each padded to its longest
    text: in the split's stored order, or with `by_length` ordered by token count within each
    LENGTH_RUN_ROWS texts (for sets every row of which is read, such as an agreement set, and a model
    that masks padding: it changes only which texts share a batch)."""
    from miaotui.data.corpus import load_split
    from miaotui.data.tokenizers import encode, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path, max_length)
    examples = load_split(split)
    run = run_rows(batch_size, by_length)
    for start in range(0, len(examples), run):
        chunk = examples[start : start + run]
        encoded = encode(tokenizer, [e.text for e in chunk], names=tuple(dict.fromkeys((*input_names, "attention_mask"))))
        labels = np.array([e.label for e in chunk], dtype=np.int64)
        for rows, feed in trimmed_batches(encoded, input_names, batch_size, by_length):
            if with_labels:
                feed["labels"] = labels[rows]
            yield feed
