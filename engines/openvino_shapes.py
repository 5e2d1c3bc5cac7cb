"""A bounded set of call shapes for the openvino engine, and one text on models compiled for its width.

OpenVINO's CPU plugin prepares each new input shape of a dynamic model on its first call (3-5 ms for
MiniLM) and keeps what it prepared in a runtime cache that grows with every shape it has seen: MiniLM's
engine, called with the batch sizes and text lengths a service gets (1,500 calls of 1 to 32 texts, 8 to
200 tokens), went from 161 MiB to 1.8 GiB resident (benchmarks/NOTES.md, eleventh session). So a call's
width is padded up to a multiple of a step (at most MAX_WIDTHS widths; Classifier.predict pads, since it
knows the padding id) and its rows are run in slices of powers of two (Engine.run): at most 16 x 7 shapes,
all prepared after a while. Memory then stayed at 363 MiB, and the same calls took 42.7 s against 48.5.

A model compiled for one static shape runs faster than one compiled for a range: the plugin fuses the
elementwise chains (LayerNorm's affine, the residual adds) into its snippets kernels, splits attention by
rows, and skips the per-node shape work a dynamic model repeats on every call (one text of 40 tokens:
0.97 ms against 1.32). A model per shape would cost too much memory (each compiled model holds its own
repacked weights, about 31 MiB for MiniLM), so only one text a call runs on models compiled for [1, width],
each compiled on the first call at that width (or all at once: Engine.prepare_one_text).

Both apply only where the model masks padding: by a padding-mask input, or by the tokenizer's padding id
itself (lstm-sentiment reads each text's state at its last real token), which the build checks on the
compiled model before it pads anything. The answer is then the text's own up to rounding. Which compiled
model answers depends on the input's shape alone: the same input always gets the same answer.

What each call shape costs is measured at build (`CallCosts`: rows in powers of two by a few widths, the
rest interpolated), so that Classifier.predict cuts its batches by the engine's own times: a call of a
few rows on the dynamic model pays 2-3 ms of shape work that one text on its fixed-width model does not,
and a batch padded to the next width step costs what that width costs. Priced in padded tokens instead,
the cut was right on average and wrong at this grain (benchmarks/NOTES.md, twelfth session).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_WIDTHS = 16
MIN_STEP = 16  # tokens; finer steps gained nothing on real texts (one text: 16 and 8 timed alike)
ONE_TEXT_CHOICES = ("auto", "static", "dynamic")  # --openvino-one-text
ONE_TEXT_MIN_GAIN = 0.05  # kept where one text runs at least this much faster (geometric mean over a few widths)


def width_step(seq_max: int) -> int:
    return max(MIN_STEP, math.ceil(seq_max / MAX_WIDTHS))


def padded_width(width: int, step: int, seq_min: int, seq_max: int) -> int:
    """The width a call of `width` tokens is padded to: the next multiple of `step`, within the engine's range."""
    return min(max(math.ceil(width / step) * step, seq_min), seq_max)


def power_of_two_rows(rows: int, limit: int) -> list[int]:
    """`rows` cut into slices of powers of two, largest first, none above `limit` (21 -> 16, 4, 1)."""
    slices = []
    while rows:
        size = min(1 << (rows.bit_length() - 1), 1 << (limit.bit_length() - 1))
        slices.append(size)
        rows -= size
    return slices


# Rows the build times a call at (powers of two up to this); a larger slice costs what this many rows
# cost at its width, times its share (calls of 32 x 128 tokens already run at the kernels' pace).
COST_MAX_ROWS = 32


def cost_rows(max_batch: int) -> list[int]:
    """The row counts the build times: powers of two up to the engine's max batch or COST_MAX_ROWS."""
    top = min(max_batch, COST_MAX_ROWS)
    return [1 << power for power in range(top.bit_length()) if 1 << power <= top]


def cost_widths(step: int, seq_min: int, seq_max: int) -> list[int]:
    """The widths the build times: the shortest padded width, doubling from there, and the longest (MiniLM,
    1..256 tokens: 16, 32, 64, 128, 256); the ones between are interpolated."""
    widths, width = [], padded_width(seq_min, step, seq_min, seq_max)
    while width < seq_max:
        widths.append(width)
        width = padded_width(width * 2, step, seq_min, seq_max)
    return widths + [seq_max]


@dataclass(frozen=True)
class CallCosts:
    """Milliseconds of one engine call of rows[i] x widths[j] tokens (ms[i][j]), as the build measured them."""

    rows: tuple[int, ...]
    widths: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]

    @classmethod
    def from_json(cls, table: dict) -> "CallCosts":
        return cls(tuple(table["rows"]), tuple(table["widths"]), tuple(tuple(row) for row in table["ms"]))

    def to_json(self) -> dict:
        return {"rows": list(self.rows), "widths": list(self.widths), "ms": [list(row) for row in self.ms]}

    def call_ms(self, rows: int, width: int) -> float:
        """One call of `rows` (a power of two) x `width` tokens: linear between the timed widths."""
        largest = self.rows[-1]
        if rows > largest:
            return self.call_ms(largest, width) * rows / largest
        return float(np.interp(width, self.widths, self.ms[self.rows.index(rows)]))

    def calls(self, rows: int, width: int, limit: int) -> list[int]:
        """The calls a batch of `rows` at `width` is run in (Engine.run), each a power of two of at most
        `limit` rows: slices (21 -> 16, 4, 1), or one call of the next power of two, its last rows copies,
        where that costs less (an LSTM, whose time goes by its steps rather than its rows; MiniLM at 3
        texts of 16 tokens: 4 rows 4.2 ms against 2 + 1 rows 3.8 + 1.8)."""
        slices = power_of_two_rows(rows, limit)
        above = 1 << (rows - 1).bit_length()
        if len(slices) > 1 and above <= limit and (self.call_ms(above, width)
                                                   < sum(self.call_ms(size, width) for size in slices)):
            return [above]
        return slices

    def batch_ms(self, rows: int, width: int, limit: int) -> float:
        """A batch of `rows` at `width`, run in the calls `calls` makes of it."""
        return sum(self.call_ms(size, width) for size in self.calls(rows, width, limit))


def call_costs_problem(table: object) -> str | None:
    """What is wrong with a sidecar's cost table (None when nothing): rows and widths ascending positive
    ints, the rows powers of two from 1, and one positive time per row and width."""
    if not isinstance(table, dict) or set(table) != {"rows", "widths", "ms"}:
        return "an object with keys rows, widths, ms"

    def ascending(values: object) -> bool:
        return (isinstance(values, list) and bool(values) and all(type(v) is int and v > 0 for v in values)
                and values == sorted(set(values)))

    rows, widths, ms = table["rows"], table["widths"], table["ms"]
    if not ascending(rows) or rows != [1 << power for power in range(len(rows))]:
        return "rows: powers of two from 1"
    if not ascending(widths):
        return "widths: ascending positive ints"
    if not (isinstance(ms, list) and len(ms) == len(rows) and all(
            isinstance(row, list) and len(row) == len(widths)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in row)
            for row in ms)):
        return f"ms: {len(rows)} lists of {len(widths)} positive numbers each"
    return None


def unsuitable(ranges, padding_mask: str | None, padding_id: int | None = None) -> str | None:
    """Why the engine cannot take padded widths (None when it can): every input must be [batch, seq] with
    one batch and one sequence dim, batch 1 allowed, the sequence dynamic, and the padding masked, by a
    padding-mask input or by the tokenizer's padding id in input_ids (which the build then checks:
    padding_changes_answer)."""
    names = [t.name for t in ranges]
    if not ranges or any(len(t.dims) != 2 for t in ranges):
        return "its inputs are not all [batch, seq]"
    if len({t.dims[0] for t in ranges}) != 1 or len({t.dims[1] for t in ranges}) != 1:
        return "its inputs do not share one batch and one sequence dim"
    if ranges[0].min[0] != 1:
        return "its batch range does not start at 1"
    if ranges[0].min[1] == ranges[0].max[1]:
        return "its sequence length is fixed"
    if mask_input(ranges, padding_mask) is None and (padding_id is None or "input_ids" not in names):
        return "it has no padding mask and no tokenizer padding id in input_ids (padding would change its answer)"
    return None


def mask_input(ranges, padding_mask: str | None) -> str | None:
    """The input that masks padding: the config's padding mask, else one named attention_mask (None if neither)."""
    names = [t.name for t in ranges]
    mask = padding_mask or ("attention_mask" if "attention_mask" in names else None)
    return mask if mask in names else None


# Padded by its padding id, a model must answer as unpadded up to this much of its largest answer (at least
# 1): lstm-sentiment's INT8 engine answered bitwise alike; padded with a real character's id (7) instead,
# its logits moved by 1.7 times the largest one.
PADDING_TOLERANCE = 1e-3


def padding_changes_answer(run, feeds: list[dict[str, np.ndarray]], pad_id: int, widths: list[int]) -> str | None:
    """Why padding input_ids with `pad_id` cannot be used (None when it can): each feed (rows of real tokens)
    is answered as it is and padded to each of `widths` beyond its own; `run` maps a feed to its outputs.
    For models that mask padding by the id itself rather than by a mask input (lstm-sentiment reads each
    text's state at its last real token and keeps padding out of its max): Classifier.predict already
    pads a batch to its longest text that way, the engine's width step would pad further."""
    from miaotui.data.tokenizers import pad_to

    worst, where = 0.0, None
    for feed in feeds:
        width = feed["input_ids"].shape[1]
        expected = run(feed)
        for padded in widths:
            if padded <= width:
                continue
            for name, answer in run(pad_to(feed, padded, pad_id)).items():
                reference = np.asarray(expected[name], np.float64)
                scale = max(1.0, float(np.abs(reference).max(initial=0)))
                diff = float(np.abs(np.asarray(answer, np.float64) - reference).max(initial=0)) / scale
                if diff > worst:
                    worst, where = diff, (name, width, padded)
    if worst <= PADDING_TOLERANCE:
        return None
    name, width, padded = where
    return (f"padding input_ids with the tokenizer's padding id {pad_id} changed its answer ({name} by {worst:.2g} of "
            f"its largest value, {width} tokens padded to {padded}): it does not mask padding by that id")
