"""One text a call at fixed widths, for the openvino engine.

OpenVINO's CPU plugin runs a model compiled for one static input shape faster than the same model
compiled for a range: it fuses the elementwise chains (LayerNorm's affine, the residual adds) into its
snippets kernels, splits attention by rows, and skips the per-node shape work a dynamic model repeats
on every call. minilm-sentiment, one text of 40 tokens, on a Zen 5 EPYC: 0.97 ms against 1.32
(benchmarks/NOTES.md). A model compiled for every width would cost too much memory (each compiled model
holds its own repacked weights, about 31 MiB for MiniLM), so one text is padded up to the next of at most
MAX_WIDTHS widths, and a model compiled for [1, width] runs it, compiled on the first call at that width.

Padding is added only where the model masks it (a padding-mask input), so the answer is the text's own up
to rounding; the runtime pads (Classifier.predict) and the gate judges one text a call padded the same way.
Which compiled model answers depends on the input's shape alone: the same input always gets the same answer.
"""

from __future__ import annotations

import math

MAX_WIDTHS = 16
MIN_STEP = 16  # tokens; finer steps gained nothing on real texts (16 and 8 timed alike)
ONE_TEXT_CHOICES = ("auto", "static", "dynamic")  # --openvino-one-text
ONE_TEXT_MIN_GAIN = 0.05  # kept where one text at the opt width runs at least this much faster


def width_step(seq_max: int) -> int:
    return max(MIN_STEP, math.ceil(seq_max / MAX_WIDTHS))


def one_text_width(width: int, step: int, seq_min: int, seq_max: int) -> int:
    """The width one text of `width` tokens is padded to: the next multiple of `step`, within the engine's range."""
    return min(max(math.ceil(width / step) * step, seq_min), seq_max)


def unsuitable(ranges, padding_mask: str | None) -> str | None:
    """Why the engine cannot run one text at fixed widths (None when it can): every input must be
    [batch, seq] with one batch and one sequence dim, batch 1 allowed, the sequence dynamic, and the
    padding masked (the runtime pads the text)."""
    names = [t.name for t in ranges]
    if not ranges or any(len(t.dims) != 2 for t in ranges):
        return "its inputs are not all [batch, seq]"
    if len({t.dims[0] for t in ranges}) != 1 or len({t.dims[1] for t in ranges}) != 1:
        return "its inputs do not share one batch and one sequence dim"
    if ranges[0].min[0] != 1:
        return "its batch range does not start at 1"
    if ranges[0].min[1] == ranges[0].max[1]:
        return "its sequence length is fixed"
    mask = padding_mask or ("attention_mask" if "attention_mask" in names else None)
    if mask not in names:
        return "it has no padding mask (padding would change its answer)"
    return None
