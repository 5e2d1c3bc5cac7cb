"""A config's [data] sets (calibration, validation) as checked, streamed feed dicts.

A set is a text file (.csv, .tsv, .jsonl, .parquet: data/text_files.py tokenizes it), an .npz file
(arrays named like the inputs, samples along the first axis, optionally an int array `labels`) or a
"module:function" whose function yields feed dicts batch by batch (the same dicts: numpy arrays
named like the inputs, batch first, optionally `labels`). Any way every batch is checked against the config before any model sees it, so a bad set fails with one
line that names the set, the batch and the tensor, never inside ONNX Runtime.
"""

from __future__ import annotations

import hashlib
import importlib
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from miaotui.config import FLOAT_DTYPES, TEXT_SUFFIXES, Config, folder_importable, is_callable_reference
from miaotui.errors import InputError

LABELS = "labels"
NPZ_BATCH_SIZE = 32


@dataclass(frozen=True)
class DataSet:
    """One [data] entry of a config: where it comes from and how to read it."""

    config: Config
    key: str  # "calibration" or "validation": names the set in errors
    source: str  # an absolute .npz path or "module:function"

    @property
    def where(self) -> str:
        return f"data.{self.key} ({self.source})"

    @property
    def by_length(self) -> bool:
        """Whether a text file is batched by length (data/feeds.py): the validation set, which every
        stage reads whole (the gate, the reference, the quantizer's agreement), of a model that takes
        attention_mask, whose answers do not depend on which texts share a batch. Calibration keeps the
        file's order: a prefix of it is the calibration sample."""
        return self.key == "validation" and "attention_mask" in self.config.inputs

    def batches(self, samples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Checked feed dicts (with `labels` when the set has them), at most `samples` rows in all."""
        remaining, offset = samples, 0
        for index, feed in enumerate(self._raw_batches()):
            if remaining is not None and remaining <= 0:
                return
            feed = check_feed(self.config, feed, f"{self.where}: batch {index} (from sample {offset})")
            rows = _rows(feed)
            offset += rows
            if remaining is not None and rows > remaining:
                feed = {name: array[:remaining] for name, array in feed.items()}
                rows = remaining
            if remaining is not None:
                remaining -= rows
            yield feed

    def feeds(self, samples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Checked feed dicts of the model's inputs only (what a calibrator or a session takes)."""
        return (without_labels(feed) for feed in self.batches(samples))

    def _raw_batches(self) -> Iterable[dict]:
        from miaotui.data.text_files import is_text_file, tokenized_batches

        if self.source.endswith(".npz"):
            return _npz_batches(Path(self.source), self.where, _npz_batch_size(self.config))
        if is_text_file(self.source):
            return tokenized_batches(self.config, Path(self.source), self.where, _npz_batch_size(self.config),
                                     by_length=self.by_length)
        return _function_batches(self.config, self.source, self.where)


@dataclass(frozen=True)
class DataSummary:
    samples: int
    fingerprint: str  # sha256 over every array's name, dtype, shape and bytes, in order
    has_labels: bool


def data_set(config: Config, key: str, override: str | None = None) -> DataSet:
    """The config's calibration or validation set, or `override` (a path or "module:function")."""
    source = override or getattr(config.data, key)
    if source is None:
        raise InputError(f"{config.path}: data.{key}: missing; the {key} set is needed here "
                         f"(a {', '.join(TEXT_SUFFIXES)} file of texts, an .npz of arrays named like the inputs, "
                         "or \"module:function\" yielding feed dicts)")
    if override and not is_callable_reference(override):
        path = Path(override).resolve()
        if not path.is_file():
            raise InputError(f"{override}: {key} data file does not exist")
        source = str(path)
    if not is_callable_reference(source) and Path(source).suffix.lower() not in (".npz", *TEXT_SUFFIXES):
        raise InputError(f"{source}: data.{key}: expected an .npz, {', '.join(TEXT_SUFFIXES)} file "
                         "or \"module:function\"")
    return DataSet(config, key, source)


def summarize(data: DataSet, samples: int | None = None) -> DataSummary:
    """One checking pass: how many samples, and a fingerprint that keys caches on the data itself."""
    summary = summarize_batches(data.batches(samples))
    if summary.samples == 0:
        raise InputError(f"{data.where}: the {data.key} set is empty")
    return summary


def summarize_batches(batches: Iterable[dict[str, np.ndarray]]) -> DataSummary:
    """How many samples `batches` hold and their fingerprint (0 samples for none)."""
    digest = hashlib.sha256()
    count, labels = 0, False
    for feed in batches:
        for name in sorted(feed):
            array = np.ascontiguousarray(feed[name])
            digest.update(f"{name}|{array.dtype}|{array.shape}".encode())
            digest.update(array.tobytes())
        count += _rows(feed)
        labels = labels or LABELS in feed
    return DataSummary(count, digest.hexdigest(), labels)


def check_feed(config: Config, feed: object, where: str) -> dict[str, np.ndarray]:
    """A feed dict as the model takes it, or InputError naming the tensor and what was expected."""
    if not isinstance(feed, dict):
        raise InputError(f"{where}: expected a dict of arrays named like the inputs, got {type(feed).__name__}")
    expected = list(config.inputs)
    missing = [name for name in expected if name not in feed]
    unknown = [name for name in feed if name not in config.inputs and name != LABELS]
    if unknown:
        raise InputError(f"{where}: unknown array {unknown[0]!r} (the model's inputs: {', '.join(expected)})")
    if missing:
        raise InputError(f"{where}: input {missing[0]!r} is missing (the model's inputs: {', '.join(expected)})")

    checked: dict[str, np.ndarray] = {}
    sizes: dict[str, tuple[int, str]] = {}  # dim name -> (size, input that set it)
    for name, spec in config.inputs.items():
        array = feed[name]
        if not isinstance(array, np.ndarray):
            raise InputError(f"{where}: input {name!r}: expected a numpy array, got {type(array).__name__}")
        if array.dtype != np.dtype(spec.dtype):
            raise InputError(f"{where}: input {name!r}: expected dtype {spec.dtype}, got {array.dtype}")
        if array.ndim != len(spec.shape):
            raise InputError(f"{where}: input {name!r}: expected rank {len(spec.shape)} {_shape_text(spec.shape)}, "
                             f"got shape {list(array.shape)}")
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
            if isinstance(want, int):
                if got != want:
                    raise InputError(f"{where}: input {name!r}: axis {axis} must be {want}, got shape {list(array.shape)}")
                continue
            dim = config.dims[want]
            if not dim.min <= got <= dim.max:
                raise InputError(f"{where}: input {name!r}: {want}={got} is outside [dims] {want} "
                                 f"({dim.min}..{dim.max}), shape {list(array.shape)}")
            if want in sizes and sizes[want][0] != got:
                raise InputError(f"{where}: input {name!r}: {want}={got} but input {sizes[want][1]!r} has {want}={sizes[want][0]}")
            sizes[want] = (got, name)
        if spec.dtype in FLOAT_DTYPES and not np.isfinite(array).all():
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise InputError(f"{where}: input {name!r}: {bad} NaN or Inf values")
        checked[name] = array

    if LABELS in feed:
        labels = feed[LABELS]
        rows = _rows(checked)
        if not isinstance(labels, np.ndarray) or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{where}: labels: expected a 1-D integer array, got "
                             f"{getattr(labels, 'dtype', type(labels).__name__)} {list(getattr(labels, 'shape', []))}")
        if len(labels) != rows:
            raise InputError(f"{where}: labels: {len(labels)} labels for {rows} samples")
        classes = len(config.model.labels) if config.model.labels else None
        if classes is not None and labels.size and not (0 <= labels.min() and labels.max() < classes):
            raise InputError(f"{where}: labels: values must lie in 0..{classes - 1} (model.labels), "
                             f"got {int(labels.min())}..{int(labels.max())}")
        checked[LABELS] = labels.astype(np.int64, copy=False)
    return checked


def without_labels(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: array for name, array in feed.items() if name != LABELS}


def _rows(feed: dict[str, np.ndarray]) -> int:
    # Samples lie along the first axis of every input (the batch dim).
    first = next(array for name, array in feed.items() if name != LABELS)
    return int(first.shape[0]) if first.ndim else 1


def _shape_text(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _npz_batch_size(config: Config) -> int:
    """Batches as large as the model's batch dim allows, up to NPZ_BATCH_SIZE."""
    first = next(iter(config.inputs.values())).shape[0]
    return first if isinstance(first, int) else min(NPZ_BATCH_SIZE, config.dims[first].max)


def _npz_batches(path: Path, where: str, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Rows read batch by batch from each array's stream inside the zip (compressed or not), so a
    large set is never in memory at once; np.load would read each array whole."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise InputError(f"{where}: not a readable .npz file: {error}") from error
    with archive:
        streams, headers = {}, {}
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            name = member[: -len(".npy")]
            stream = archive.open(member)
            try:
                version = np.lib.format.read_magic(stream)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran_order, dtype = read_header(stream)
            except ValueError as error:
                raise InputError(f"{where}: array {name!r} is not a valid .npy entry: {error}") from error
            if dtype.hasobject:
                raise InputError(f"{where}: array {name!r} holds Python objects (dtype {dtype}); "
                                 "only plain numeric arrays are read (never unpickled)")
            if fortran_order or not shape:
                raise InputError(f"{where}: array {name!r}: expected a C-ordered array with samples on the "
                                 f"first axis, got shape {list(shape)}{' in Fortran order' if fortran_order else ''}")
            streams[name], headers[name] = stream, (shape, dtype)
        if not streams:
            return
        counts = {name: shape[0] for name, (shape, _) in headers.items()}
        if len(set(counts.values())) != 1:
            listed = ", ".join(f"{name} {count}" for name, count in counts.items())
            raise InputError(f"{where}: arrays disagree on the number of samples (first axis): {listed}")
        total = next(iter(counts.values()))
        for start in range(0, total, batch_size):
            rows = min(batch_size, total - start)
            batch = {}
            for name, stream in streams.items():
                shape, dtype = headers[name]
                count = rows * int(np.prod(shape[1:], dtype=np.int64))
                data = stream.read(count * dtype.itemsize)
                if len(data) != count * dtype.itemsize:
                    raise InputError(f"{where}: array {name!r} is truncated")
                batch[name] = np.frombuffer(data, dtype=dtype, count=count).reshape((rows, *shape[1:])).copy()
            yield batch


def _function_batches(config: Config, source: str, where: str) -> Iterator[dict]:
    module_name, _, function_name = source.rpartition(":")
    with folder_importable(config):  # a data.py beside the config imports like a package module
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise InputError(f"{where}: importing module {module_name!r} failed: {type(error).__name__}: {error}") from error
        function: Callable | None = getattr(module, function_name, None)
        if not callable(function):
            raise InputError(f"{where}: module {module_name!r} has no function {function_name!r}")
        batches = function()
        if not isinstance(batches, Iterable) or isinstance(batches, dict):
            raise InputError(f"{where}: {function_name}() must return or yield feed dicts, got {type(batches).__name__}")
        yield from batches


def spread_rows(data: DataSet, count: int, total: int | None = None) -> list[dict[str, np.ndarray]]:
    """`count` samples (each a batch of one) spread evenly over the whole set, in the set's order. A
    prefix would do for a set in stored order, but a set batched by length (data/feeds.py) begins
    with its shortest texts. `total`: the set's sample count where the caller has summarized it,
    else counted here in a pass of its own."""
    total = summarize(data).samples if total is None else total
    step = max(total / count, 1.0)
    wanted = {int(index * step) for index in range(min(count, total))}
    return [row for index, row in enumerate(sample_rows(data.batches())) if index in wanted]


def sample_rows(batches):
    """One sample at a time (as a batch of one), so a sample count can be cut exactly."""
    for feed in batches:
        for index in range(len(next(iter(feed.values())))):
            yield {name: value[index : index + 1] for name, value in feed.items()}


def rebatch(rows, size: int = 16):
    """Rows back into batches; rows of unequal shapes (sequence lengths) start a new batch."""
    batch: list[dict] = []
    for row in rows:
        if batch and any(row[k].shape != batch[0][k].shape for k in row):
            yield _stack_rows(batch)
            batch = []
        batch.append(row)
        if len(batch) == size:
            yield _stack_rows(batch)
            batch = []
    if batch:
        yield _stack_rows(batch)


def _stack_rows(rows: list[dict]) -> dict:
    return {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}
