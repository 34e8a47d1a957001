"""The quality metrics a study can judge by, and the one place that knows which way each is better.

A metric is measured per prompt (a trial's image against the baseline's) and summarized as an
`Interval`: the mean with its two-sided confidence interval. Everything that compares two quality
figures or judges a limit asks this module, never `metric == "clip_loss"`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Metric:
    name: str
    direction: str  # "minimize" or "maximize", as Optuna names it
    label: str  # axis and table label
    unit: str

    @property
    def lower_is_better(self) -> bool:
        return self.direction == "minimize"


METRICS = {
    "clip_loss": Metric("clip_loss", "minimize", "CLIP loss (baseline - setting)", "CLIP points"),
    "psnr": Metric("psnr", "maximize", "PSNR vs baseline (dB)", "dB"),
    "ssim": Metric("ssim", "maximize", "SSIM vs baseline", ""),
    # measured where a spec asks (measure/perceptual.py): it needs AlexNet's weights
    "lpips": Metric("lpips", "minimize", "LPIPS vs baseline (AlexNet)", ""),
}
OPTIONAL = ("lpips",)  # absent from a record that did not measure it
PSNR_CAP = 100.0  # dB reported for identical images, so values stay finite (JSON, Optuna)
# What a figure can be: an interval's bound past it says nothing, so reports stop there
# ("SSIM 0.998 [0.994, 1.000]", not 1.002).
VALUE_RANGES = {"psnr": (0.0, PSNR_CAP), "ssim": (-1.0, 1.0), "lpips": (0.0, math.inf)}


def t_quantile(confidence: float, df: float) -> float:
    """The two-sided Student-t quantile for `confidence` with `df` degrees of freedom."""
    from scipy.stats import t as student_t  # a second to import: the CLI's light commands skip it

    return float(student_t.ppf(0.5 + confidence / 2, df))


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided confidence interval (bounds may be infinite: not measured)."""

    mean: float
    low: float = -math.inf
    high: float = math.inf

    @classmethod
    def of(cls, values, confidence: float = 0.95,
           within: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
        """The t interval of the mean of `values`, its bounds kept `within` what the figure can
        be. Not narrowed for a finite set of prompts: they come in a fixed order, so a prefix is
        not a random sample of them."""
        values = np.asarray(values, dtype=np.float64)
        mean = float(values.mean())
        if len(values) < 2:
            return cls(mean, -math.inf, math.inf)
        half = t_quantile(confidence, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
        return cls(mean, float(max(within[0], mean - half)), float(min(within[1], mean + half)))

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def value_range(figure: str) -> tuple[float, float]:
    """What `figure` (a metric, or a video figure such as "ssim_worst_frame") can be."""
    return VALUE_RANGES.get(figure.removesuffix("_worst_frame"), (-math.inf, math.inf))


def direction(metric: str) -> str:
    return METRICS[metric].direction


def at_least_as_good(a: float, b: float, metric: str) -> bool:
    """Is quality `a` at least as good as `b`?"""
    return a <= b if METRICS[metric].lower_is_better else a >= b


def best_case(interval: Interval, metric: str) -> float:
    """The interval's bound on the good side (the low end of a loss or distance, the high end of
    PSNR/SSIM)."""
    return interval.low if METRICS[metric].lower_is_better else interval.high


def unsafe_side(interval: Interval, metric: str, rule: str = "mean") -> float:
    """The figure the feasibility rule checks: the mean, or (rule "bound") the confidence bound on
    the unsafe side (the high end of a loss, the low end of PSNR/SSIM)."""
    if rule == "mean":
        return interval.mean
    return interval.high if METRICS[metric].lower_is_better else interval.low


def quality_margin(interval: Interval, metric: str, limit: float, rule: str = "mean") -> float:
    """How far the metric is past its limit under `rule`: <= 0 is feasible (Optuna's convention)."""
    value = unsafe_side(interval, metric, rule)
    margin = value - limit if METRICS[metric].lower_is_better else limit - value
    return margin if math.isfinite(margin) else 1e9


def prompt_statistic(values, metric: str, statistic: str) -> float:
    """A figure over prompts: their mean, the worst prompt's, or ("p10") the value nine prompts in
    ten are at least as good as (the 10th percentile on the bad side)."""
    values = np.asarray(values, dtype=np.float64)
    if statistic == "mean":
        return float(values.mean())
    bad_high = METRICS[metric].lower_is_better
    if statistic == "worst":
        return float(values.max() if bad_high else values.min())
    return float(np.percentile(values, 90 if bad_high else 10))


def past_limit(interval: Interval, metric: str, limit: float) -> bool:
    """The whole interval lies on the wrong side of the limit: it fails under either rule."""
    return not at_least_as_good(best_case(interval, metric), limit, metric)


def limit_sign(metric: str) -> str:
    """How a limit reads: 'clip_loss <= 0.5', 'psnr >= 30'."""
    return "<=" if METRICS[metric].lower_is_better else ">="
