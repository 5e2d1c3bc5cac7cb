"""reference.npz: the PyTorch model's outputs on the validation split, computed once per model and data.

Recomputed only when the model's files, the graph-shaping config or the validation data change (its
fingerprint is in the stage key), written atomically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from miaotui.stages.export import model_inputs
from miaotui.stages.runner import Pipeline, StageResult, Unit
from miaotui.validation.reference import OUTPUT_PREFIX, collect_outputs
from miaotui.workdir import REFERENCE


@dataclass
class ReferenceResult(StageResult):
    @property
    def samples(self) -> int:
        return self.details["samples"]

    @property
    def check(self) -> str:
        return f"PyTorch on {self.samples} samples of {self.details['set']}"


class Reference(Unit):
    """PyTorch's outputs on the config's validation split. `summary`: the set's DataSummary when the
    caller has already read it (it is a full pass over the data); `model`: an already loaded model."""

    name = "reference"
    primary = REFERENCE
    result_type = ReferenceResult

    def __init__(self, summary=None, model=None):
        self.summary = summary
        self.model = model

    def prepare(self, pipeline: Pipeline) -> None:
        from miaotui.data.datasets import data_set, summarize

        self.validation = data_set(pipeline.config, "validation")  # refuses a config without data.validation
        self.summary = self.summary or summarize(self.validation)
        self.names = tuple(pipeline.config.model.outputs)

    def inputs(self, pipeline: Pipeline) -> dict[str, str]:
        return model_inputs(pipeline.config) | {"validation data": self.summary.fingerprint}

    def options(self) -> dict[str, Any]:
        return {"outputs": list(self.names)}

    def tools(self) -> dict[str, str]:
        import torch

        return {"torch": torch.__version__}

    def produce(self, pipeline: Pipeline, scratch: Path) -> dict[str, Any]:
        from miaotui.export.parity import torch_outputs
        from miaotui.models.loading import load_model

        model = self.model if self.model is not None else load_model(pipeline.config)
        names, validation = self.names, self.validation
        outputs, labels = collect_outputs(lambda feed: torch_outputs(model, feed, names), validation.batches(), names,
                                          validation.where, pipeline.progress, "PyTorch reference")
        arrays = {OUTPUT_PREFIX + name: value for name, value in outputs.items()}
        if labels is not None:
            arrays["labels"] = labels
        np.savez(scratch / REFERENCE, **arrays)
        return {"samples": int(len(outputs[names[0]])), "labels": labels is not None, "set": validation.where}
