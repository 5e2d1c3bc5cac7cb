"""The percentile calibrator's histograms (export/histogram.py) against ONNX Runtime's own: the same
counts, edges and extremes, bit for bit, so that the ranges (and the graphs) do not change."""

from __future__ import annotations

import numpy as np
from onnxruntime.quantization.calibrate import HistogramCollector

from miaotui.export.histogram import counts_on_edges, fast_collector


class _Settings:  # what fast_collector reads off ONNX Runtime's calibrator
    method, symmetric, num_bins, num_quantized_bins, percentile, scenario = \
        "percentile", True, 2048, 128, 99.999, "same"


def _batches(rng) -> list[dict[str, list[np.ndarray]]]:
    """Three tensors over six batches: heavy tails, a range that grows batch by batch (the edges
    are extended), values exactly on edges, zeros and a tensor of one sign."""
    batches = []
    for step in range(6):
        wide = rng.standard_t(3, size=(4, 64, 96)).astype(np.float32) * (1 + step)
        gelu = np.maximum(rng.standard_normal((4, 64, 384)).astype(np.float32), -0.17) * (2.0 if step == 3 else 1.0)
        steps = (rng.integers(-40, 40, size=(4, 64, 8)) / 8).astype(np.float32)  # many values on bin edges
        batches.append({"wide": [wide], "gelu": [gelu], "steps": [steps]})
    return batches


def test_histograms_and_ranges_equal_onnxruntimes_bit_for_bit():
    rng = np.random.default_rng(7)
    theirs = HistogramCollector("percentile", True, 2048, 128, 99.999, "same")
    ours = fast_collector(_Settings())
    for batch in _batches(rng):
        theirs.collect({name: [a.copy() for a in arrays] for name, arrays in batch.items()})
        ours.collect(batch)
    assert set(ours.histogram_dict) == set(theirs.histogram_dict) == {"wide", "gelu", "steps"}
    grown = 0
    for name, (hist, edges, low, high) in theirs.histogram_dict.items():
        our_hist, our_edges, our_low, our_high = ours.histogram_dict[name]
        np.testing.assert_array_equal(our_hist, hist)
        np.testing.assert_array_equal(our_edges, edges)
        assert our_edges.dtype == edges.dtype and (our_low, our_high) == (low, high)
        grown += len(edges) > 2049
    assert grown >= 2  # the growing ranges took the edge-extension branch
    ranges = [{name: tuple(float(v) for v in found) for name, found in collector.compute_collection_result().items()}
              for collector in (ours, theirs)]
    assert ranges[0] == ranges[1]


def test_counts_on_edges_equal_numpys_at_the_ends_and_fall_back_on_uneven_edges():
    values = np.abs(np.random.default_rng(1).standard_normal(100_000)).astype(np.float32)
    uneven = np.array([0.0, 0.1, 0.15, 1.0, 2.5, 4.0], np.float32)
    np.testing.assert_array_equal(counts_on_edges(values, uneven), np.histogram(values, bins=uneven)[0])
    even = np.linspace(0.2, 3.0, 301).astype(np.float32)  # values below the first and above the last edge
    values = np.concatenate([values, even, [np.nan, np.inf, 3.0, 0.2]]).astype(np.float32)  # and on edges, NaN
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(counts_on_edges(values, even), np.histogram(values, bins=even)[0])
        wider = np.concatenate([even, np.arange(3.0 + 0.0093, 4.5, 0.0093)])  # float64 edges, as a grown histogram's
        np.testing.assert_array_equal(counts_on_edges(values, wider), np.histogram(values, bins=wider)[0])
