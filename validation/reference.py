"""reference.npz: the PyTorch model's outputs on the validation split, computed once per model and data.

A stage of the work dir like the others: recomputed only when the model's files, the graph-shaping
config or the validation data change (its fingerprint is in the stage key), written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from miaotui.artifacts import StageResult, WorkDir, run_stage
from miaotui.config import Config
from miaotui.errors import InputError

REFERENCE_NAME = "reference.npz"
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


def run_reference_stage(config: Config, work_dir: str | Path, force: bool = False, progress: bool = True,
                        model=None, summary=None) -> StageResult:
    """PyTorch's outputs on the config's validation split, in `work_dir`/reference.npz. `summary`: the
    set's DataSummary when the caller has already read it (it is a full pass over the data)."""
    import torch

    from miaotui.data.datasets import data_set, summarize
    from miaotui.export.parity import torch_outputs
    from miaotui.export.stage import export_inputs
    from miaotui.models.loading import load_model

    validation = data_set(config, "validation")  # refuses a config without data.validation
    summary = summary or summarize(validation)
    inputs = export_inputs(config) | {"validation data": summary.fingerprint}
    names = tuple(config.model.outputs)

    def produce(scratch: Path) -> dict[str, Any]:
        nonlocal model
        model = model if model is not None else load_model(config)
        outputs, labels = collect_outputs(lambda feed: torch_outputs(model, feed, names), validation.batches(), names,
                                          validation.where, progress, "PyTorch reference")
        arrays = {OUTPUT_PREFIX + name: value for name, value in outputs.items()}
        if labels is not None:
            arrays["labels"] = labels
        np.savez(scratch / REFERENCE_NAME, **arrays)
        return {"samples": int(len(outputs[names[0]])), "labels": labels is not None, "set": validation.where}

    return run_stage(WorkDir(work_dir), {"torch": torch.__version__}, "reference", REFERENCE_NAME, inputs,
                     {"outputs": list(names)}, produce, force)
