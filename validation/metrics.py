"""Parity metrics of one output: an engine's answers against the PyTorch reference's.

Element-wise errors come from Polygraphy's comparator (SimpleCompareFunc: max/mean absolute and
relative error, relative to the reference); what it does not measure is here: cosine similarity,
NaN/Inf counts, and the task-level metrics of a classifier (top-1 and top-k agreement, KL divergence
of the softmax, accuracy against labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from miaotui.runtime.classifier import softmax


@dataclass
class OutputMetrics:
    output: str
    samples: int
    max_abs_error: float
    mean_abs_error: float
    max_rel_error: float
    cosine: float  # cosine similarity of the whole output (all samples, flattened)
    worst_sample_cosine: float  # the lowest per-sample cosine (near-zero logits make it noisy: information only)
    nan_count: int  # in the engine's output
    inf_count: int
    top1_agreement: float | None = None  # for [batch, classes] outputs
    topk_agreement: float | None = None  # the reference's top-1 within the engine's top-k
    top_k: int | None = None
    kl_divergence: float | None = None  # mean KL(softmax(reference) || softmax(engine)), nats
    reference_accuracy: float | None = None  # with labels
    engine_accuracy: float | None = None
    accuracy_drop: float | None = None  # reference - engine


def kl_divergence(reference_logits: np.ndarray, engine_logits: np.ndarray) -> float:
    """Mean over samples of KL(p || q), p and q the softmax of the reference's and the engine's logits."""
    p = softmax(reference_logits.astype(np.float64))
    log_p = np.log(np.clip(p, 1e-300, None))
    shifted = engine_logits.astype(np.float64) - engine_logits.max(axis=-1, keepdims=True)
    log_q = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(np.mean(np.sum(p * (log_p - log_q), axis=-1)))


def cosine_per_sample(reference: np.ndarray, engine: np.ndarray) -> np.ndarray:
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = engine.reshape(len(engine), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    # Two zero vectors are the same answer; one zero vector against another is not.
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    return np.where(both_zero, 1.0, dots / np.where(norms == 0, np.inf, norms))


def topk_agreement(reference: np.ndarray, engine: np.ndarray, k: int) -> float:
    """Share of samples whose reference top-1 class is among the engine's k highest."""
    k = min(k, engine.shape[-1])
    top_k = np.argpartition(-engine, k - 1, axis=-1)[:, :k]
    return float(np.mean(np.any(top_k == reference.argmax(-1)[:, None], axis=-1)))


def elementwise_errors(output: str, reference: np.ndarray, engine: np.ndarray) -> tuple[float, float, float]:
    """(max abs, mean abs, max rel) error via Polygraphy's comparator, relative to the reference."""
    from polygraphy.comparator import IterationResult, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # it logs every comparison; the report says it once
        compare = SimpleCompareFunc(atol=np.inf, rtol=np.inf, check_shapes=True)
        # Polygraphy divides by the second result's magnitude: the reference goes second.
        result = compare(IterationResult({output: engine}, runner_name="engine"),
                         IterationResult({output: reference}, runner_name="reference"))[output]
    return float(result.max_absdiff), float(result.mean_absdiff), float(result.max_reldiff)


def output_metrics(output: str, reference: np.ndarray, engine: np.ndarray, labels: np.ndarray | None = None,
                   top_k: int = 2, classifier: bool = True) -> OutputMetrics:
    """Every metric of one output; the classification ones when `classifier` and the output is [batch, classes]."""
    if reference.shape != engine.shape:
        raise ValueError(f"output '{output}': reference shape {reference.shape}, engine shape {engine.shape}")
    nan_count, inf_count = int(np.isnan(engine).sum()), int(np.isinf(engine).sum())
    finite = nan_count == 0 and inf_count == 0
    if finite:
        max_abs, mean_abs, max_rel = elementwise_errors(output, reference, engine)
        whole = float(cosine_per_sample(reference.reshape(1, -1), engine.reshape(1, -1))[0])
        worst = float(cosine_per_sample(reference, engine).min())
    else:  # a NaN answer has no error size; it fails on its own
        max_abs = mean_abs = max_rel = whole = worst = float("nan")
    metrics = OutputMetrics(output, len(reference), max_abs, mean_abs, max_rel, whole, worst, nan_count, inf_count)
    if classifier and reference.ndim == 2 and reference.shape[1] >= 2:
        top_ref, top_engine = reference.argmax(1), engine.argmax(1)
        metrics.top1_agreement = float(np.mean(top_ref == top_engine))
        metrics.top_k = min(top_k, reference.shape[1])
        metrics.topk_agreement = topk_agreement(reference, engine, top_k) if finite else float("nan")
        metrics.kl_divergence = kl_divergence(reference, engine) if finite else float("nan")
        if labels is not None:
            metrics.reference_accuracy = float(np.mean(top_ref == labels))
            metrics.engine_accuracy = float(np.mean(top_engine == labels))
            metrics.accuracy_drop = metrics.reference_accuracy - metrics.engine_accuracy
    return metrics
