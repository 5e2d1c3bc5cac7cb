"""Activation ranges from real data, with ONNX Runtime's calibrators, streamed and cached.

ONNX Runtime's calibrators keep every activation of one collect_data() call in memory (16 MiniLM
batches with a histogram method were OOM-killed at 24 GB here), while their range and histogram
collectors merge across calls. So the data is fed one batch per call: memory stays at one batch's
activations however many samples there are.

calibration.json is a cache keyed on what decides the ranges (the model's sha256, a fingerprint of
the data, the sample count, the method, the smoothing strength, the ONNX Runtime version): a rerun
with the same key and no new tensor to calibrate does not run the model again.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from miaotui.artifacts import atomic_write_json
from miaotui.config import QUANTIZE_METHODS
from miaotui.errors import InputError, MiaotuiError

# Histogram methods estimate a distribution's tail: with a handful of samples the estimate is noise.
MIN_SAMPLES = {"minmax": 1, "entropy": 16, "percentile": 16}
# Below this many samples the ranges are usable but may miss what real traffic holds: a warning.
FEW_SAMPLES = 128
CACHE_FORMAT = 3  # 3: per-channel [low, high] ranges for smoothing (2 had max|x| only)
# Each method's calibrator settings; part of the cache key, so changing one recalibrates.
METHOD_SETTINGS = {
    "minmax": {},
    # ONNX Runtime's entropy histogram spans [-T, T], both signs: INT8 has 255 levels over it. Its
    # default of 128 quantized bins (TensorRT's figure, for a one-sided |x| histogram) models 7-bit
    # quantization and clipped MiniLM's LayerNorm outputs to 0.4-0.5 of their range here.
    "entropy": {"num_bins": 2048, "num_quantized_bins": 255},
    "percentile": {"num_bins": 2048, "percentile": 99.999},
}


@dataclass(frozen=True)
class CalibrationKey:
    model_sha256: str
    data_fingerprint: str
    samples: int
    method: str
    settings: str  # the method's calibrator settings (METHOD_SETTINGS)
    smooth_alpha: float  # 0: no smoothing
    onnxruntime: str


@dataclass(frozen=True)
class CalibrationRequest:
    key: CalibrationKey
    tensors: tuple[str, ...]  # the activations whose ranges the quantizer needs


@dataclass
class Calibration:
    key: CalibrationKey
    ranges: dict[str, tuple[float, float]]  # tensor name -> (lowest, highest) seen or estimated
    seconds: float
    cached: bool = False
    # per-channel [[lows], [highs]] of the activations smoothing rewrote, seen before smoothing
    channel_ranges: dict[str, list[list[float]]] = field(default_factory=dict)

    def covers(self, request: CalibrationRequest) -> bool:
        return self.key == request.key and set(request.tensors) <= set(self.ranges)

    def to_json(self) -> dict:
        return {"format": CACHE_FORMAT, "key": asdict(self.key), "seconds": round(self.seconds, 3),
                "ranges": {name: list(bounds) for name, bounds in sorted(self.ranges.items())},
                "channel_ranges": dict(sorted(self.channel_ranges.items()))}


def check_sample_count(method: str, samples: int, where: str) -> list[str]:
    """InputError when the method cannot work with so few samples; warnings when it works poorly."""
    if method not in QUANTIZE_METHODS:
        raise InputError(f"calibration method {method!r}: expected one of {', '.join(QUANTIZE_METHODS)}")
    if samples < MIN_SAMPLES[method]:
        raise InputError(f"{where}: {samples} samples; {method} calibration needs at least {MIN_SAMPLES[method]} "
                         "(add texts, or --method minmax)")
    if samples < FEW_SAMPLES:
        return [f"{where}: only {samples} calibration samples; ranges may miss what real inputs reach "
                f"(use {FEW_SAMPLES} or more)"]
    return []


def load_cached(path: Path, key: CalibrationKey) -> Calibration | None:
    """What calibration.json holds when it was made with this key (same model, data, method)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != CACHE_FORMAT or CalibrationKey(**data["key"]) != key:
            return None
        ranges = {name: (float(lo), float(hi)) for name, (lo, hi) in data["ranges"].items()}
        channel_ranges = {name: [[float(v) for v in low], [float(v) for v in high]]
                          for name, (low, high) in data.get("channel_ranges", {}).items()}
    except (ValueError, KeyError, TypeError):
        return None  # a damaged cache only costs a recalibration
    return Calibration(key, ranges, float(data.get("seconds", 0.0)), cached=True, channel_ranges=channel_ranges)


def save(calibration: Calibration, path: Path) -> None:
    atomic_write_json(path, calibration.to_json())


def calibrate(model_path: Path, batches: Iterable[dict[str, np.ndarray]], request: CalibrationRequest,
              progress: bool = True) -> Calibration:
    """Run the model on every batch and return the range of each tensor the request names."""
    from onnxruntime.quantization import calibrate as ort_calibrate
    from tqdm import tqdm

    key = request.key
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="miaotui-calibrate-") as scratch, quiet_onnxruntime():
        # ONNX Runtime writes a shape-inferred copy beside the model it calibrates (NAME-inferred.onnx):
        # it gets links to the model in the scratch folder, so nothing lands beside the work dir's graph.
        model_path = _linked(model_path, Path(scratch))
        common = {"augmented_model_path": str(Path(scratch) / "augmented.onnx"),
                  "use_external_data_format": _has_external_data(model_path),
                  # Symmetric: TensorRT takes symmetric INT8 only, so histograms are of |x| too.
                  "symmetric": True}
        calibrator_class = getattr(ort_calibrate, onnxruntime_method(key.method).name + "Calibrater")
        calibrator = calibrator_class(model_path, None, **METHOD_SETTINGS[key.method], **common)
        if key.method == "percentile":  # the same histograms, a third of the time (export/histogram.py)
            from miaotui.export.histogram import fast_collector

            calibrator.collector = fast_collector(calibrator)
        # ONNX Runtime would calibrate every input and output of every node of the quantized op
        # types (attention scores included, 4x a hidden state each); histograms of what nobody
        # reads cost minutes. Only the tensors the quantizer needs are made outputs.
        wanted = set(request.tensors)
        select = calibrator.select_tensors_to_calibrate
        calibrator.select_tensors_to_calibrate = lambda model: _only(select(model), wanted)
        calibrator.augment_graph()
        calibrator.create_inference_session()
        with tqdm(total=key.samples, desc=f"calibrating ({key.method})", unit="sample", disable=not progress,
                  leave=False) as bar:
            for feed in batches:
                calibrator.collect_data(_OneBatch(feed))
                bar.update(next(iter(feed.values())).shape[0])
        tensors = calibrator.compute_data()
        del calibrator
    ranges = {}
    for name, data in tensors.items():
        lowest, highest = data.range_value
        ranges[name] = (float(np.asarray(lowest).min()), float(np.asarray(highest).max()))
    missing = sorted(set(request.tensors) - set(ranges))
    if missing:
        raise MiaotuiError(f"calibration found no range for {missing[0]!r} (and {len(missing) - 1} more)")
    return Calibration(key, ranges, time.perf_counter() - started)


def onnxruntime_cache(calibration: Calibration, path: Path) -> None:
    """The ranges in ONNX Runtime's own calibration-cache format, for quantize_static to read."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    data = {name: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
            for name, (lo, hi) in calibration.ranges.items()}
    save_tensors_data(TensorsData(onnxruntime_method(calibration.key.method), data), path)


def onnxruntime_method(method: str):
    """miaotui's method name ("minmax", ...) as ONNX Runtime's CalibrationMethod."""
    from onnxruntime.quantization.calibrate import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def _only(selected, wanted: set[str]):
    tensors, value_infos = selected
    return {name for name in tensors if name in wanted}, value_infos


class _OneBatch:
    """A CalibrationDataReader over exactly one feed dict: one collect_data() call per batch."""

    def __init__(self, feed: dict[str, np.ndarray]):
        self.feed: dict[str, np.ndarray] | None = feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed, self.feed = self.feed, None
        return feed


def _linked(model_path: Path, folder: Path) -> Path:
    """`model_path` (and its external weights) as symbolic links in `folder`."""
    for source in (model_path, Path(str(model_path) + ".data")):
        if source.is_file():
            (folder / source.name).symlink_to(source.resolve())
    return folder / model_path.name


def _has_external_data(model_path: Path) -> bool:
    return Path(str(model_path) + ".data").is_file()


class quiet_onnxruntime:
    """ONNX Runtime's quantization tools log advice through the root logger at WARNING and print
    progress to stdout (once per batch): stdout is the command's table, so both are silenced."""

    def __enter__(self):
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        self.stdout = contextlib.redirect_stdout(io.StringIO())
        self.stdout.__enter__()

    def __exit__(self, *exc):
        self.stdout.__exit__(*exc)
        logging.getLogger().setLevel(self.level)
