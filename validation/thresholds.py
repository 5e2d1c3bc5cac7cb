"""The bars an engine must clear, per precision, and the verdict of each.

Defaults: fp32 tight (the engine is the same arithmetic as PyTorch up to operation order), fp16 looser,
int8 and int8-fp16 judged at the task level (top-1 agreement and accuracy drop) with loose element
bounds that only catch a broken graph. A config's [validate.PRECISION] table overrides any bar.
NaN or Inf in an engine's output always fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from miaotui.config import VALIDATE_BARS, Config

# bar name -> (metric, "max" | "min")
BAR_METRICS = {
    "max_abs_error": ("max_abs_error", "max"),
    "max_mean_abs_error": ("mean_abs_error", "max"),
    "max_rel_error": ("max_rel_error", "max"),
    "min_cosine": ("cosine", "min"),
    "min_top1_agreement": ("top1_agreement", "min"),
    "min_topk_agreement": ("topk_agreement", "min"),
    "max_kl_divergence": ("kl_divergence", "max"),
    "max_accuracy_drop": ("accuracy_drop", "max"),
}
assert set(BAR_METRICS) == set(VALIDATE_BARS)

DEFAULT_BARS: dict[str, dict[str, float]] = {
    "fp32": {"max_abs_error": 1e-3, "min_cosine": 0.99999, "min_top1_agreement": 0.999, "max_kl_divergence": 1e-5,
             "max_accuracy_drop": 0.002},
    "fp16": {"max_abs_error": 5e-2, "min_cosine": 0.999, "min_top1_agreement": 0.999, "max_kl_divergence": 1e-3,
             "max_accuracy_drop": 0.005},
    "int8": {"min_cosine": 0.99, "min_top1_agreement": 0.99, "min_topk_agreement": 0.995, "max_kl_divergence": 0.02,
             "max_accuracy_drop": 0.01},
    "int8-fp16": {"min_cosine": 0.99, "min_top1_agreement": 0.99, "min_topk_agreement": 0.995, "max_kl_divergence": 0.02,
                  "max_accuracy_drop": 0.01},
}


@dataclass(frozen=True)
class Check:
    output: str
    bar: str  # the config key, e.g. min_top1_agreement
    metric: str  # the metric it reads, e.g. top1_agreement
    value: float | None
    limit: float
    kind: str  # "max" | "min"
    passed: bool

    def sentence(self) -> str:
        sign = "<=" if self.kind == "max" else ">="
        value = "n/a" if self.value is None else f"{self.value:.6g}"
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.output} {self.metric} {value} (bar: {sign} {self.limit:g}, {self.bar}) {verdict}"


def bars_for(config: Config, precision: str) -> tuple[dict[str, float], set[str]]:
    """(bars, the bars the config set itself): defaults for `precision` with the config's on top."""
    own = dict(config.validate.get(precision, {}))
    return DEFAULT_BARS.get(precision, DEFAULT_BARS["fp32"]) | own, set(own)


def judge(metrics, bars: dict[str, float]) -> list[Check]:
    """One Check per bar whose metric this output has, plus the NaN/Inf check that always applies."""
    checks = [Check(metrics.output, "no NaN or Inf", "nan_or_inf_count", float(metrics.nan_count + metrics.inf_count),
                    0.0, "max", metrics.nan_count + metrics.inf_count == 0)]
    for bar, limit in bars.items():
        metric, kind = BAR_METRICS[bar]
        value = getattr(metrics, metric)
        if value is None:
            continue  # e.g. accuracy without labels (refused earlier when the config asks for it)
        passed = not math.isnan(value) and (value <= limit if kind == "max" else value >= limit)
        checks.append(Check(metrics.output, bar, metric, value, limit, kind, passed))
    return checks
