"""ONNX Runtime's percentile histograms, the same counts in a third of the time.

ONNX Runtime's HistogramCollector bins |x| of each calibration batch against the edges its first
batch chose (extended when a batch reaches past them), and hands those edges to np.histogram as an
array: numpy then sorts every block of values and searches the edges, its slow path. The edges are
evenly spaced (np.histogram's own, then steps of the same width), so numpy's arithmetic for even
bins applies: a first guess from (x - first) / width, then a one-bin correction against the edges
themselves, which puts every value where searchsorted would (a value equal to an edge in the bin
it opens, the last edge in the last bin, anything outside or NaN nowhere). Edges further than a
quarter bin from an even grid (where a guess could be off by more) fall back to np.histogram.

Measured on 128 MiniLM calibration samples (55 tensors): the histograms 20.3 s with the edge arrays,
7.8 s this way. The counts, and so the ranges, equal ONNX Runtime's bit for bit (tests/test_histogram.py).
"""

from __future__ import annotations

import numpy as np

BLOCK = 65536  # values per step: numpy's histogram block size, keeps the temporaries in cache


def counts_on_edges(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """np.histogram(values, bins=edges)[0] for evenly spaced `edges` (any others: np.histogram itself)."""
    bins = len(edges) - 1
    first, last = edges[0], edges[-1]
    width = (float(last) - float(first)) / bins
    # Within a quarter bin of an even grid, a guess is never more than one bin off.
    if not width > 0 or np.abs(edges - (float(first) + width * np.arange(bins + 1))).max() >= width / 4:
        return np.histogram(values, bins=edges)[0]
    # Bin 0 below the first edge, bin bins + 1 above the last: an overflow bin at each end saves
    # filtering. The last real bin holds its right edge (numpy's rule), so the top bin starts just above
    # it; below and above, -inf and NaN compare false with everything, as the guesses need.
    bounds = np.concatenate(([-np.inf], edges[:-1], [np.nextafter(last, np.inf)], [np.nan])).astype(edges.dtype)
    scale = 1.0 / width
    counts = np.zeros(bins + 2, np.intp)
    for start in range(0, values.size, BLOCK):
        block = values[start:start + BLOCK]
        guess = (block - first) * scale + 1
        np.fmin(guess, bins + 1, out=guess)  # +inf and NaN (fmin takes the number) to the top bin
        np.fmax(guess, 0, out=guess)  # -inf and anything below to the bottom one
        index = guess.astype(np.intp)
        index -= block < bounds[index]
        index += block >= bounds[index + 1]
        counts += np.bincount(index, minlength=bins + 2)
    return counts[1:-1]


def fast_collector(calibrator):
    """A HistogramCollector for `calibrator` (ONNX Runtime's percentile calibrator) whose |x|
    histograms are counted by counts_on_edges; everything else is ONNX Runtime's."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    class AbsoluteHistogramCollector(HistogramCollector):
        def collect_absolute_value(self, name_to_arr):
            for tensor, arrays in name_to_arr.items():
                values = arrays[0] if isinstance(arrays, list) and len(arrays) == 1 else np.asarray(arrays)
                values = values.ravel()
                if values.dtype != np.float32 or tensor not in self.histogram_dict or values.size == 0:
                    # its first batch; FP16 too (guesses in FP16 arithmetic could miss by more than a bin)
                    super().collect_absolute_value({tensor: values})
                    continue
                lowest, highest = np.nanmin(values), np.nanmax(values)
                top = max(abs(lowest), abs(highest))  # max |x|, without another pass
                hist, edges, old_min, old_max = self.histogram_dict[tensor]
                if top > edges[-1]:  # as ONNX Runtime does: more bins of the same width
                    width = edges[1] - edges[0]
                    edges = np.hstack((edges, np.arange(edges[-1] + width, top + width, width)))
                magnitudes = np.absolute(values)
                counts = counts_on_edges(magnitudes, edges)
                counts[: len(hist)] += hist
                self.histogram_dict[tensor] = (counts, edges.astype(values.dtype), min(old_min, lowest),
                                               max(old_max, highest))

    return AbsoluteHistogramCollector(method=calibrator.method, symmetric=calibrator.symmetric,
                                      num_bins=calibrator.num_bins, num_quantized_bins=calibrator.num_quantized_bins,
                                      percentile=calibrator.percentile, scenario=calibrator.scenario)
