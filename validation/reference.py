"""reference.npz (written by the reference stage, miaotui/stages/reference.py): reading it, and running a
model or engine over a data set to collect its outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from miaotui.errors import InputError

OUTPUT_PREFIX = "output."  # npz keys: output.<name> per model output, and labels when the set has them


@dataclass
class Reference:
    outputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    samples: int


def load_reference(path: Path) -> Reference:
    with np.load(path, allow_pickle=False) as data:
        outputs = {key[len(OUTPUT_PREFIX):]: data[key] for key in data.files if key.startswith(OUTPUT_PREFIX)}
        labels = data["labels"] if "labels" in data.files else None
    samples = len(next(iter(outputs.values()))) if outputs else 0
    return Reference(outputs, labels, samples)


def _join(name: str, parts: list[np.ndarray], where: str) -> np.ndarray:
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise InputError(f"{where}: output '{name}' changes shape between batches ({sorted(shapes)}); the parity gate "
                         "compares per-sample outputs of one shape (e.g. [batch, classes])")
    return np.concatenate(parts)


def collect_outputs(run_batch, batches, output_names, where: str, progress: bool, description: str):
    """Run `run_batch(inputs) -> {name: array}` over every batch; outputs joined, and the labels."""
    from tqdm import tqdm

    from miaotui.data.datasets import LABELS, without_labels

    parts: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    labels: list[np.ndarray] = []
    labelled = True
    with tqdm(desc=description, unit="sample", disable=not progress, leave=False) as bar:
        for feed in batches:
            outputs = run_batch(without_labels(feed))
            for name in output_names:
                parts[name].append(np.asarray(outputs[name]))
            if LABELS in feed and labelled:
                labels.append(feed[LABELS])
            else:
                labelled = False
            bar.update(len(next(iter(feed.values()))))
    if not parts[output_names[0]]:
        raise InputError(f"{where}: the validation set is empty")
    joined = {name: _join(name, values, where) for name, values in parts.items()}
    return joined, (np.concatenate(labels) if labelled and labels else None)
