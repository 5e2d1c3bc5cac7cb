"""Classifier.load(work_dir_or_engine): an engine, its tokenizer and label names; predict(texts).

    clf = Classifier.load("build/lstm-sentiment")
    clf.predict(["这本书写得很好", "太差了"])   # [Prediction(label='positive', score=0.97, index=1), ...]

The tokenizer and labels come from the work dir's config.toml (written by the export stage), read
with the standard library: a service needs neither torch nor onnx, nor the model's training files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from miaotui.data.tokenizers import ENCODED
from miaotui.errors import InputError
from miaotui.runtime.engine import Engine
from miaotui.workdir import WorkDir

TEXT_INPUTS = ENCODED  # what the tokenizer gives: input_ids, attention_mask, token_type_ids


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float  # softmax probability of the label
    index: int  # class index


# What one engine call costs beyond its tokens, in tokens: a batch is worth splitting when the padding
# it saves exceeds this (chosen on lstm-sentiment's and minilm-sentiment's CPU engines with
# benchmarks/predict_texts.py; 16, 64, 128 and 256 tried).
CALL_OVERHEAD_TOKENS = 128
ATTENTION_TOKENS = 384  # a row of L tokens costs L + L^2 / this: attention grows with the square of the length


def batches_by_cost(lengths: Sequence[int], max_batch: int, overhead: int = CALL_OVERHEAD_TOKENS,
                    call_cost: Callable[[int, int], float] | None = None) -> list[slice]:
    """Cut `lengths` (ascending) into consecutive batches of at most `max_batch` that minimize the summed
    cost of the batches: `call_cost(rows, longest)` where the engine measured its call shapes (Engine.batch_ms),
    else the padded rows priced in tokens (each row of a batch as long as its longest, L tokens costing
    L + L^2 / ATTENTION_TOKENS) plus `overhead` per call. One batch when lengths are alike, several when a
    few long texts would pad many short ones. Dynamic programming over the sorted lengths, O(n x max_batch)."""
    count = len(lengths)
    best = [0.0] + [float("inf")] * count  # best[j]: cheapest cut of the first j lengths
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        longest = lengths[end - 1]
        for start in range(max(0, end - max_batch), end):
            rows = end - start
            batch = (call_cost(rows, longest) if call_cost is not None
                     else overhead + rows * (longest + longest * longest / ATTENTION_TOKENS))
            if best[start] + batch < best[end]:
                best[end], cut[end] = best[start] + batch, start
    batches, end = [], count
    while end > 0:
        batches.append(slice(cut[end], end))
        end = cut[end]
    return batches[::-1]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis (shifted by the max: no overflow)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class Classifier:
    def __init__(self, engine: Engine, tokenizer, labels: Sequence[str] | None, output: str):
        self.engine = engine
        self.tokenizer = tokenizer
        self.labels = list(labels) if labels else None
        self.output = output
        names = [t.name for t in engine.inputs]
        if not set(names) <= set(TEXT_INPUTS) or "input_ids" not in names:
            raise InputError(f"{engine.path}: the engine takes {', '.join(names)}; a Classifier feeds "
                             f"{', '.join(TEXT_INPUTS)} from its tokenizer: call Engine directly")
        ids = engine.metadata.input("input_ids")
        self._seq_min, self._seq_max = ids.min[1], ids.max[1]

    @classmethod
    def load(cls, path: str | Path, backend: str | None = None, precision: str | None = None,
             threads: int | None = None) -> "Classifier":
        """`path`: a work dir (its best engine for this machine is chosen) or an engine file inside one."""
        from miaotui.data.tokenizers import configure, load_tokenizer
        from miaotui.engines.choice import choose_engine

        path = Path(path)
        if path.is_dir():
            work, engine_path = WorkDir(path), choose_engine(path, backend, precision)
        elif path.is_file():
            engine_path = path
            work = WorkDir.around(path)
        else:
            raise InputError(f"{path}: no such work dir or engine file")
        config_path = work.config
        model = work.model_table()
        if model is None:
            raise InputError(f"{config_path}: missing; a Classifier reads the tokenizer and labels from the work dir's "
                             "config.toml (written by 'miaotui export')")
        if not model.get("tokenizer"):
            raise InputError(f"{config_path}: key 'model.tokenizer' is missing; a Classifier needs a tokenizer.json "
                             "(call Engine directly to feed tensors)")
        engine = Engine.load(engine_path, threads)
        tokenizer_path = (work.root / model["tokenizer"]).resolve()
        tokenizer = load_tokenizer(tokenizer_path)
        ids = engine.metadata.input("input_ids")
        configure(tokenizer, ids.max[1])  # truncate to the longest sequence the engine takes
        outputs = model.get("outputs") or [engine.outputs[0].name]
        return cls(engine, tokenizer, model.get("labels"), outputs[0])

    def predict(self, texts: str | Sequence[str], batch_size: int | None = None) -> list[Prediction]:
        """Label and score per text, in the order given. The texts are tokenized once and cut into
        batches of similar length by cost (batches_by_cost), each padded to its longest text."""
        return self.predict_with_logits(texts, batch_size)[0]

    def predict_with_logits(self, texts: str | Sequence[str],
                            batch_size: int | None = None) -> tuple[list[Prediction], np.ndarray]:
        """predict()'s answers and the output they came from, one row per text (float32)."""
        from miaotui.data.tokenizers import encode, pad_to, padding_id

        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            return [], np.zeros((0, len(self.labels or ())), np.float32)
        for position, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"texts[{position}]: got {type(text).__name__}; predict() takes texts (str)")
            if not text.strip():
                raise InputError(f"texts[{position}] is empty: there is nothing to classify")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate: tokenizers would raise a TypeError
                raise InputError(f"texts[{position}]: not valid Unicode at character {error.start} "
                                 f"({text[error.start]!r}, a lone surrogate)") from None
        size = min(batch_size or self.engine.max_batch or 32, self.engine.max_batch or 32)
        names = [t.name for t in self.engine.inputs]
        # Once, padded to the longest; each batch takes its columns. The mask counts real tokens even
        # for an engine that takes ids alone.
        encoded = encode(self.tokenizer, texts, names=list(dict.fromkeys([*names, "attention_mask"])))
        lengths = encoded["attention_mask"].sum(axis=1)  # real tokens per text
        order = np.argsort(lengths, kind="stable")
        dtypes = {t.name: np.dtype(t.dtype) for t in self.engine.inputs}
        pad_id = padding_id(self.tokenizer)
        predictions: list[Prediction | None] = [None] * len(texts)
        rows_out: list[np.ndarray | None] = [None] * len(texts)
        sorted_lengths = [int(lengths[i]) for i in order]
        # At least seq_min tokens; padded further where the engine runs a few widths faster (openvino)
        widths = {length: self.engine.padded_width(max(length, self._seq_min)) for length in set(sorted_lengths)}
        call_cost = None
        if self.engine.knows_call_costs:  # priced by the engine's own times per call shape
            call_cost = lambda rows, longest: self.engine.batch_ms(rows, widths[longest])  # noqa: E731
        for chunk in batches_by_cost(sorted_lengths, size, call_cost=call_cost):
            rows = order[chunk]
            width = widths[sorted_lengths[chunk.stop - 1]]
            feed = {name: encoded[name][rows, :width].astype(dtypes[name], copy=False) for name in names}
            feed = pad_to(feed, width, pad_id)
            logits = self.engine.run(feed)[self.output]
            probabilities = softmax(logits.astype(np.float64))
            for row, index in enumerate(rows):
                rows_out[index] = logits[row]
                best = int(probabilities[row].argmax())
                label = self.labels[best] if self.labels and best < len(self.labels) else str(best)
                predictions[index] = Prediction(label, float(probabilities[row, best]), best)
        return predictions, np.stack(rows_out).astype(np.float32, copy=False)  # type: ignore[return-value]
