"""Raw texts (and labels) from .csv, .tsv, .jsonl and .parquet files, tokenized into the model's inputs.

Rows are read as a stream (the csv and json modules line by line, pyarrow's Parquet reader batch by
batch), so memory stays flat in the file's size. Each row is checked as it is read: a missing
column, an empty text, a label outside `[model] labels` or a line that is not UTF-8 ends the run
with one line naming file:line. Labels are class names (mapped through `[model] labels`) or integers.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from miaotui.config import Config, TEXT_SUFFIXES
from miaotui.data.tokenizers import ENCODED, encode, load_tokenizer, pad_to, padding_id
from miaotui.errors import InputError

PARQUET_BATCH_ROWS = 1024
LABELS = "labels"


@dataclass(frozen=True)
class TextRow:
    text: str
    pair: str | None
    label: int | None  # class index, or None when the file has no label column
    where: str  # "file:line" (or "file: row N" for Parquet), for the messages about this row


@dataclass(frozen=True)
class Columns:
    text: str
    pair: str | None
    label: str
    labels: tuple[str, ...] | None  # class names; None: integer labels of any value


def is_text_file(source: str) -> bool:
    return Path(source).suffix.lower() in TEXT_SUFFIXES


def read_rows(path: Path, columns: Columns) -> Iterator[TextRow]:
    """The file's rows in order, each checked; InputError at the first bad one."""
    suffix = path.suffix.lower()
    readers = {".csv": _csv_records, ".tsv": _csv_records, ".jsonl": _jsonl_records, ".parquet": _parquet_records}
    count = 0
    for where, record, has_label in readers[suffix](path, columns):
        yield _row(record, where, columns, has_label)
        count += 1
    if count == 0:
        raise InputError(f"{path}: no rows of data (expected a '{columns.text}' column with one text per row)")


def _row(record: dict, where: str, columns: Columns, has_label: bool) -> TextRow:
    text = _text(record, columns.text, where)
    pair = _text(record, columns.pair, where) if columns.pair else None
    label = _label(record.get(columns.label), where, columns) if has_label else None
    return TextRow(text, pair, label, where)


def _text(record: dict, column: str, where: str) -> str:
    value = record.get(column)
    if not isinstance(value, str):
        raise InputError(f"{where}: column '{column}': expected a text, got {'nothing' if value is None else repr(value)}")
    if not value.strip():
        raise InputError(f"{where}: column '{column}' is empty: there is nothing to classify")
    return value


def _label(value, where: str, columns: Columns) -> int:
    names = columns.labels
    if isinstance(value, str):
        value = value.strip()
        if names and value in names:
            return names.index(value)
        if value.lstrip("-").isdigit():
            value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0 and (names is None or value < len(names)):
            return value
    expected = f"one of {', '.join(names)} or 0..{len(names) - 1}" if names else "a class index (0, 1, ...)"
    raise InputError(f"{where}: column '{columns.label}': expected {expected}, got {value!r}")


def _check_header(path: Path, header: list[str], columns: Columns, where: str) -> bool:
    """Whether the file has a label column; InputError when a text column is missing."""
    for column in (columns.text, columns.pair):
        if column and column not in header:
            shown = ", ".join(map(repr, header[:10])) or "none"
            raise InputError(f"{where}: no column '{column}' (columns: {shown}); name it with [data] "
                             f"{'text_pair_column' if column == columns.pair else 'text_column'}")
    return columns.label in header


def _utf8_lines(path: Path) -> Iterator[str]:
    """The file's lines decoded one by one, so that a bad byte is reported with its line number."""
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, 1):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise InputError(f"{path}:{number}: not UTF-8 (byte {raw[error.start]:#04x} at column "
                                 f"{error.start + 1}); save the file as UTF-8") from None


def _csv_records(path: Path, columns: Columns):
    reader = csv.reader(_utf8_lines(path), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        header = next(reader, None)
        if header is None:
            raise InputError(f"{path}: the file is empty (expected a header row naming the columns)")
        has_label = _check_header(path, header, columns, f"{path}:1")
        for row in reader:
            if not row:
                continue  # a blank line
            where = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                raise InputError(f"{where}: {len(row)} fields, the header has {len(header)} "
                                 "(quote texts that hold the delimiter)")
            yield where, dict(zip(header, row)), has_label
    except csv.Error as error:
        raise InputError(f"{path}:{reader.line_num}: not valid {path.suffix[1:].upper()}: {error}") from None


def _jsonl_records(path: Path, columns: Columns):
    has_label = None
    for number, line in enumerate(_utf8_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{where}: not a JSON object: {error}") from None
        if not isinstance(record, dict):
            raise InputError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
        if has_label is None:  # the first record decides, like a header: later ones must agree
            has_label = _check_header(path, list(record), columns, where)
        if has_label and columns.label not in record:
            raise InputError(f"{where}: no '{columns.label}' (earlier lines have one)")
        yield where, record, has_label


def _parquet_records(path: Path, columns: Columns):
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise InputError(f"{path}: reading Parquet needs pyarrow: pip install 'miaotui[parquet]'") from None
    try:
        source = parquet.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
        raise InputError(f"{path}: not a readable Parquet file: {error}") from None
    has_label = _check_header(path, source.schema_arrow.names, columns, str(path))
    wanted = [c for c in (columns.text, columns.pair, columns.label if has_label else None) if c]
    number = 0
    for batch in source.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
        for record in batch.to_pylist():
            number += 1
            yield f"{path}: row {number}", record, has_label


def tokenized_batches(config: Config, path: Path, where: str, batch_size: int,
                      by_length: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Feed dicts of the model's inputs (and `labels` when the file has them), each batch padded to
    its longest text (at least the seq dim's min) and truncated to the seq dim's max: in the file's
    order, or with `by_length` ordered by token count within runs of rows (data/feeds.py), for a set
    read whole by a model that masks padding."""
    from miaotui.data.feeds import run_rows

    names = list(config.inputs)
    others = [name for name in names if name not in ENCODED]
    if others or "input_ids" not in names:
        raise InputError(f"{where}: a text file feeds {', '.join(ENCODED)}; the model takes "
                         f"{', '.join(names)} (give an .npz or \"module:function\" instead)")
    if config.model.tokenizer is None:
        raise InputError(f"{config.path}: model.tokenizer: missing; {where} holds texts, which the config's "
                         "tokenizer.json turns into token ids")
    seq = config.dims[config.inputs["input_ids"].shape[-1]] if isinstance(config.inputs["input_ids"].shape[-1], str) else None
    longest = seq.max if seq else int(config.inputs["input_ids"].shape[-1])
    shortest = seq.min if seq else longest
    tokenizer = load_tokenizer(config.model.tokenizer, longest)
    columns = Columns(config.data.text_column, config.data.text_pair_column, config.data.label_column,
                      config.model.labels)
    run = run_rows(batch_size, by_length)

    rows: list[TextRow] = []
    for row in read_rows(path, columns):
        rows.append(row)
        if len(rows) == run:
            yield from _run_batches(rows, tokenizer, config, shortest, batch_size, by_length)
            rows = []
    if rows:
        yield from _run_batches(rows, tokenizer, config, shortest, batch_size, by_length)


def _run_batches(rows: list[TextRow], tokenizer, config: Config, shortest: int, batch_size: int,
                 by_length: bool) -> Iterator[dict[str, np.ndarray]]:
    """A run of rows tokenized at once (each checked against the vocabulary), cut into batches."""
    from miaotui.data.feeds import trimmed_batches

    pairs = [row.pair for row in rows] if rows[0].pair is not None else None
    # the mask counts real tokens even for a model that takes ids alone: it sets each batch's width
    encoded = encode(tokenizer, [row.text for row in rows], pairs,
                     names=list(dict.fromkeys([*config.inputs, "attention_mask"])))
    vocabulary = config.inputs["input_ids"].range
    if vocabulary is not None:
        high = int(vocabulary[1])
        bad = np.flatnonzero((encoded["input_ids"] >= high).any(axis=1))
        if bad.size:
            row = rows[int(bad[0])]
            raise InputError(f"{row.where}: the tokenizer ({config.model.tokenizer}) gives token id "
                             f"{int(encoded['input_ids'][bad[0]].max())}, outside inputs.input_ids.range "
                             f"[{int(vocabulary[0])}, {high}): the tokenizer does not match the model")
    labels = np.array([row.label for row in rows], dtype=np.int64) if rows[0].label is not None else None
    pad_id = padding_id(tokenizer)
    for batch, feed in trimmed_batches(encoded, config.inputs, batch_size, by_length):
        feed = pad_to(feed, shortest, pad_id)  # the engine's profile starts at the seq dim's min
        feed = {name: feed[name].astype(config.inputs[name].dtype, copy=False) for name in config.inputs}
        if labels is not None:
            feed[LABELS] = labels[batch]
        yield feed
