"""Reproducible training of `lstm-sentiment`: `make train MODEL=lstm-sentiment`.

Writes tokenizer.json, weights.safetensors and metrics.json beside this file (or into --out).
Runs on the CPU in a few minutes; the result is committed so that `make export` never trains.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from miaotui.data.corpus import LABELS, load_split
from miaotui.data.tokenizers import build_char_tokenizer
from miaotui.models.lstm_sentiment import EMBEDDING_DIM, HERE, HIDDEN_DIM, MAX_LENGTH, TextClassifier
from miaotui.models.training import accuracy, bucketed_batches, token_ids, write_metrics

INPUTS = ("input_ids",)
MIN_CHAR_COUNT = 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--max-train", type=int, default=None, help="train on the first N texts only (tests)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    data = {name: load_split(name) for name in ("train", "validation", "test")}
    tokenizer = build_char_tokenizer((e.text for e in data["train"]), MIN_CHAR_COUNT, MAX_LENGTH)
    encoded = {
        name: (token_ids(tokenizer, [e.text for e in split]), np.array([e.label for e in split], dtype=np.int64))
        for name, split in data.items()
    }
    if args.max_train:
        ids, labels = encoded["train"]
        encoded["train"] = (ids[: args.max_train], labels[: args.max_train])
    model = TextClassifier(tokenizer.get_vocab_size(), EMBEDDING_DIM, HIDDEN_DIM, num_classes=len(LABELS))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * (len(encoded["train"][1]) // args.batch_size + 1)
    )
    loss_fn = nn.CrossEntropyLoss()
    best_state, best_val = None, -1.0
    started = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        total, count = 0.0, 0
        for inputs, y in bucketed_batches(*encoded["train"], args.batch_size, INPUTS, rng):
            optimizer.zero_grad()
            loss = loss_fn(model(**inputs), y)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total, count = total + loss.item() * len(y), count + len(y)
        val = accuracy(model, *encoded["validation"], INPUTS)
        print(f"epoch {epoch}: train loss {total / count:.4f}  validation accuracy {val:.4f}  {time.time() - started:.0f}s")
        if val > best_val:
            best_val, best_state = val, {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test = accuracy(model, *encoded["test"], INPUTS)
    print(f"test accuracy {test:.4f} on {len(encoded['test'][1])} texts")

    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(args.out / "tokenizer.json"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / "weights.safetensors"))
    write_metrics(args.out, model, test=test, validation=best_val, test_size=len(encoded["test"][1]),
                  vocab_size=tokenizer.get_vocab_size(), epochs=args.epochs, seconds=time.time() - started)


if __name__ == "__main__":
    main()
