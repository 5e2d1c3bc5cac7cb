"""Reproducible fine-tuning of `minilm-sentiment`: `make train MODEL=minilm-sentiment`.

MiniLM's uncased WordPiece vocabulary holds only 244 CJK characters, so a quarter of this corpus
would be [UNK]. The characters seen 3+ times in the training split are added to the vocabulary.
Their embedding rows start from the characters' English meaning in CC-CEDICT (glosses.py); the
rows of the CJK characters MiniLM had are trained too, from their pretrained values. Then LoRA (rank 16) on every Linear of the encoder,
with biases, LayerNorms, the characters' rows and the head trained in full. Writes tokenizer.json,
delta.safetensors and metrics.json beside this file (or into --out).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from miaotui.data.corpus import LABELS, load_split
from miaotui.models.bert import BertClassifier, BertShape
from miaotui.models.minilm_sentiment import HERE, LORA_ALPHA, LORA_RANK, MAX_LENGTH, NEW_ROWS, RESEEDED_IDS, RESEEDED_ROWS, base_dir, base_state, merge_delta
from miaotui.models.training import accuracy, bucketed_batches, token_ids, write_metrics

INPUTS = ("input_ids", "attention_mask")
MIN_CHAR_COUNT = 3
DROPOUT = 0.1


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update B @ A (B starts at zero)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale


class ExtendedEmbedding(nn.Module):
    """The pretrained rows, frozen, followed by the added characters' rows, trained; the pretrained
    CJK characters' rows (`reseeded_ids`) are replaced by trained ones too (they start as they were)."""

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor, reseeded_ids: torch.Tensor, reseeded_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.new_rows = nn.Parameter(new_rows.clone())
        self.register_buffer("reseeded_ids", reseeded_ids.clone())
        self.reseeded_rows = nn.Parameter(reseeded_rows.clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.base.weight.index_copy(0, self.reseeded_ids, self.reseeded_rows), self.new_rows])
        return nn.functional.embedding(ids, table, padding_idx=0)


def extended_tokenizer(train_texts: list[str]):
    """MiniLM's tokenizer.json with the frequent unknown characters added to its WordPiece vocab.

    Returns (tokenizer, its spec, the added characters, the frequent CJK characters it already had).
    """
    from collections import Counter

    from tokenizers import Tokenizer

    spec = json.loads((base_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    base = Tokenizer.from_str(json.dumps(spec))
    unk = base.token_to_id("[UNK]")
    counts: Counter[str] = Counter()
    for text in train_texts:
        for word, _ in base.pre_tokenizer.pre_tokenize_str(base.normalizer.normalize_str(text)):
            if len(word) == 1:
                counts[word] += 1
    frequent = sorted((ch for ch, n in counts.items() if n >= MIN_CHAR_COUNT), key=lambda ch: (-counts[ch], ch))
    new = [ch for ch in frequent if base.token_to_id(ch) in (None, unk)]
    # MiniLM's few CJK rows sit among each other, not near their meaning: they are trained too.
    known = [ch for ch in frequent if ch not in new and "\u3400" <= ch <= "\u9fff"]
    vocab = spec["model"]["vocab"]
    for ch in new:
        vocab[ch] = len(vocab)
    spec["truncation"] = None  # set at load time by the runtime (MAX_LENGTH)
    spec["padding"] = None
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False)), spec, new, known


def initial_model(new: list[str], known: list[str], seed: int) -> BertClassifier:
    """The pretrained encoder, a fresh head, and the characters' rows started from their English
    meaning (glosses.py); the few characters without one are drawn from the old rows' distribution."""
    from tokenizers import Tokenizer

    from miaotui.models.minilm_sentiment.glosses import character_meanings, meaning_rows

    state = base_state()
    old = state["embeddings.word_embeddings.weight"]
    base = Tokenizer.from_file(str(base_dir() / "tokenizer.json"))
    generator = torch.Generator().manual_seed(seed)
    meanings = character_meanings()
    new_rows, found = meaning_rows(new, base, old, meanings)
    drawn = old.mean(0) + old.std(0) * torch.randn(len(new), old.shape[1], generator=generator)
    new_rows = torch.where(found[:, None], new_rows, drawn)
    # The CJK characters MiniLM had keep their pretrained rows as a start and are trained too.
    reseeded = [base.token_to_id(ch) for ch in known]
    print(f"{int(found.sum())} of {len(new)} added characters start from their dictionary meaning; "
          f"{len(reseeded)} known CJK characters' rows are trained")
    model = BertClassifier(BertShape(vocab_size=old.shape[0], dropout=DROPOUT), num_classes=len(LABELS))
    head = {"classifier.weight": model.classifier.weight.detach(), "classifier.bias": model.classifier.bias.detach()}
    model.load_state_dict(state | head, strict=True)
    model.embeddings.word_embeddings = ExtendedEmbedding(
        model.embeddings.word_embeddings, new_rows, torch.tensor(reseeded, dtype=torch.int64), old[reseeded]
    )
    return model


def add_lora(model: BertClassifier) -> dict[str, LoRALinear]:
    """Wrap every encoder Linear; freeze everything but LoRA, biases, LayerNorms, new rows, head."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for name, module in list(model.encoder.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                lora = LoRALinear(child, LORA_RANK, LORA_ALPHA)
                setattr(module, child_name, lora)
                wrapped[f"encoder.{name}.{child_name}"] = lora
                child.bias.requires_grad_(True)
    for name, p in model.named_parameters():
        if "LayerNorm" in name or name.startswith("classifier.") or "lora_" in name:
            p.requires_grad_(True)
    model.embeddings.word_embeddings.new_rows.requires_grad_(True)
    model.embeddings.word_embeddings.reseeded_rows.requires_grad_(True)
    return wrapped


def delta_of(model: BertClassifier, wrapped: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """What fine-tuning changed, small: new rows and LoRA factors in fp16, the rest in full."""
    embedding = model.embeddings.word_embeddings
    delta = {
        NEW_ROWS: embedding.new_rows.detach().half().contiguous(),
        RESEEDED_ROWS: embedding.reseeded_rows.detach().half().contiguous(),
        RESEEDED_IDS: embedding.reseeded_ids.clone(),
    }
    for name, lora in wrapped.items():
        delta[f"{name}.lora_A"] = lora.lora_A.detach().half().contiguous()
        delta[f"{name}.lora_B"] = lora.lora_B.detach().half().contiguous()
        delta[f"{name}.bias"] = lora.base.bias.detach().clone()
    for name, p in model.named_parameters():
        if ("LayerNorm" in name or name.startswith("classifier.")) and p.requires_grad:
            delta[name] = p.detach().clone()
    return delta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-max-length", type=int, default=MAX_LENGTH,
                        help="cut training texts at this many tokens (128 halves the longest batches' cost; 0.8455 test)")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--max-train", type=int, default=None, help="train on the first N texts only (tests)")
    parser.add_argument("--max-eval", type=int, default=None, help="evaluate on the first N texts only (tests)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    data = {name: load_split(name) for name in ("train", "validation", "test")}
    tokenizer, spec, new, known = extended_tokenizer([e.text for e in data["train"]])
    num_new = len(new)
    encoded = {}
    for name, split in data.items():
        tokenizer.enable_truncation(max_length=args.train_max_length if name == "train" else MAX_LENGTH)
        encoded[name] = (token_ids(tokenizer, [e.text for e in split]), np.array([e.label for e in split], dtype=np.int64))
    unknown = tokenizer.token_to_id("[UNK]")
    unk_share = np.mean(np.concatenate(encoded["test"][0]) == unknown)
    for name, limit in (("train", args.max_train), ("validation", args.max_eval), ("test", args.max_eval)):
        if limit:
            ids, labels = encoded[name]
            encoded[name] = (ids[:limit], labels[:limit])

    vocab_size = tokenizer.get_vocab_size()
    model = initial_model(new, known, args.seed)
    wrapped = add_lora(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    steps = args.epochs * math.ceil(len(encoded["train"][1]) / args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss()
    print(f"vocabulary +{num_new} characters ([UNK] now {unk_share:.1%} of test tokens); "
          f"{sum(p.numel() for p in trainable):,} trainable parameters; {steps} steps")

    from tqdm import tqdm

    best_delta, best_val = None, -1.0
    started = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        batches = bucketed_batches(*encoded["train"], args.batch_size, INPUTS, rng)
        total = math.ceil(len(encoded["train"][1]) / args.batch_size)
        for inputs, y in tqdm(batches, total=total, desc=f"epoch {epoch}", mininterval=5, leave=False):
            optimizer.zero_grad()
            loss = loss_fn(model(**inputs), y)
            loss.backward()
            nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
        val = accuracy(model, *encoded["validation"], INPUTS)
        print(f"epoch {epoch}: validation accuracy {val:.4f}  {time.time() - started:.0f}s", flush=True)
        if val > best_val:
            best_val, best_delta = val, delta_of(model, wrapped)

    from safetensors.torch import save_file

    # The reported numbers are those of the model rebuilt from what is saved (fp16 factors merged).
    final = BertClassifier(BertShape(vocab_size=vocab_size), num_classes=len(LABELS))
    final.load_state_dict(merge_delta(base_state(), best_delta), strict=True)
    test = accuracy(final, *encoded["test"], INPUTS)
    val = accuracy(final, *encoded["validation"], INPUTS)
    print(f"test accuracy {test:.4f} on {len(encoded['test'][1])} texts")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    save_file(best_delta, str(args.out / "delta.safetensors"))
    write_metrics(args.out, final, test=test, validation=val, test_size=len(encoded["test"][1]),
                  vocab_size=vocab_size, epochs=args.epochs, seconds=time.time() - started,
                  added_characters=num_new, test_unk_share=round(float(unk_share), 4))


if __name__ == "__main__":
    main()
