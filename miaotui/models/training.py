"""What the built-in models' training scripts share: tokenized splits, bucketed batches, accuracy."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn


def token_ids(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Unpadded ids per text (truncation stays on), so batches can be padded to their own width."""
    padding = tokenizer.padding
    tokenizer.no_padding()
    try:
        return [np.array(e.ids, dtype=np.int64) for e in tokenizer.encode_batch(texts)]
    finally:
        if padding:
            tokenizer.enable_padding(**{k: v for k, v in padding.items() if k != "length"})


def bucketed_batches(
    ids: list[np.ndarray], labels: np.ndarray, batch_size: int, input_names: tuple[str, ...],
    rng: random.Random | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Right-padded batches of texts of similar length (little time spent on padding), shuffled as
    whole batches when `rng` is given."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(chunks)
    for chunk in chunks:
        width = max(len(ids[i]) for i in chunk)
        x = np.zeros((len(chunk), width), dtype=np.int64)
        mask = np.zeros((len(chunk), width), dtype=np.int64)
        for row, i in enumerate(chunk):
            x[row, : len(ids[i])] = ids[i]
            mask[row, : len(ids[i])] = 1
        inputs = {"input_ids": torch.from_numpy(x), "attention_mask": torch.from_numpy(mask)}
        yield {k: inputs[k] for k in input_names}, torch.from_numpy(labels[chunk])


@torch.no_grad()
def accuracy(model: nn.Module, ids: list[np.ndarray], labels: np.ndarray, input_names: tuple[str, ...]) -> float:
    model.eval()
    correct = sum(
        int((model(**inputs).argmax(1) == y).sum()) for inputs, y in bucketed_batches(ids, labels, 64, input_names)
    )
    return correct / len(labels)


def write_metrics(out: Path, model: nn.Module, *, test: float, validation: float, test_size: int,
                  vocab_size: int, epochs: int, seconds: float, **extra) -> dict:
    """metrics.json beside the weights: what the README's model table and the tests quote."""
    metrics = {
        "test_accuracy": round(test, 4),
        "validation_accuracy": round(validation, 4),
        "test_size": test_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": vocab_size,
        **extra,
        "epochs": epochs,
        "train_seconds": round(seconds, 1),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(metrics))
    return metrics
