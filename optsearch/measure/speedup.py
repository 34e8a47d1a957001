"""Speedup and its confidence interval, from per-batch timings of the baseline and a setting.

Speedup is the baseline's seconds per image over the setting's (ratio of totals). Its interval
treats each batch's seconds-per-image as one independent sample of each side and works on the log
scale, where a ratio is a difference: log S = log mean(b) - log mean(s), with the delta-method
variance cv_b^2 / n_b + cv_s^2 / n_s and a Student-t quantile at Welch-Satterthwaite degrees of
freedom. With 2 batches a side the interval is honest and wide (t with ~2 df); with 100 it
narrows as 1/sqrt(n). One batch on either side gives no interval (None bounds). Slow drift during a
run is not independent noise: confirmation times baseline and setting interleaved for that reason.

Early stop looks after 2 batches, where the Welch interval is too wide to decide anything (t with
about 1 df at a Bonferroni-corrected confidence is ~100). It uses `pooled=True`: batch-to-batch
timing noise is a property of the device, not of the setting, so one variance of log batch seconds
is estimated from the baseline's batches and the setting's together (the classic pooled two-sample
t interval, df = n_b + n_s - 2). A setting whose own batches scatter more widens it.

After a single batch nothing of the setting's own noise is known: `first_batch_interval` takes
it from the device's record of how far first batches read from the rest of their trial.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from optsearch.measure.metrics import t_quantile


@dataclass(frozen=True)
class SpeedupInterval:
    """A speedup with its two-sided confidence interval (None bounds when it cannot be estimated)."""

    speedup: float
    low: float | None
    high: float | None

    def to_dict(self) -> dict:
        return {"speedup": self.speedup, "speedup_low": self.low, "speedup_high": self.high}

    def __str__(self) -> str:
        if self.low is None or self.high is None:
            return f"{self.speedup:.2f}x [-]"
        return f"{self.speedup:.2f}x [{self.low:.2f}, {self.high:.2f}]"


@dataclass(frozen=True)
class PassNoise:
    """The variance of one whole pass's log seconds beyond its batches' noise, and the degrees of
    freedom it was estimated with (inf: assumed, not measured)."""

    variance: float
    df: float
    probes: int = 0  # the one-batch baseline probes it was estimated from (0: the spec's prior)

    @property
    def percent(self) -> float:
        """One pass's spread as a percentage of its speed, for people."""
        return 100 * math.expm1(math.sqrt(self.variance))

    def to_dict(self) -> dict:
        return {"pass_noise": self.percent, "pass_noise_df": None if math.isinf(self.df) else self.df,
                "pass_noise_probes": self.probes}


def repeat_range(interval: SpeedupInterval) -> SpeedupInterval | None:
    """Where one fresh measurement of the same setting (its own pass, its own baseline) should read,
    at the interval's confidence; None without an interval.

    The interval covers the true speedup. A user who measures again reads a repeat, which carries
    as much noise as the first reading, so the range of a repeat is sqrt(2) times as wide on the
    log scale (a prediction interval for one more measurement). On this project's 2-core VM the
    interval held 83 % of repeats over six runs, this range 91 % over three (benchmarks/RESULTS.md).
    """
    if interval.low is None or interval.high is None or interval.low <= 0:
        return None
    grow = math.sqrt(2)
    return SpeedupInterval(interval.speedup,
                           interval.speedup * (interval.low / interval.speedup) ** grow,
                           interval.speedup * (interval.high / interval.speedup) ** grow)


def _half_width(terms: list[tuple[float, float]], confidence: float) -> float:
    """t (Welch-Satterthwaite df) x the standard error of a sum of variance terms (variance, df)."""
    variance = sum(v for v, _ in terms)
    if variance == 0:
        return 0.0
    denominator = sum(v * v / df for v, df in terms if not math.isinf(df))
    df = variance**2 / denominator if denominator else math.inf
    return t_quantile(confidence, max(1.0, df)) * math.sqrt(variance)


def _with_passes(speedup: float, terms: list[tuple[float, float]], confidence: float,
                 pass_noise: PassNoise | None) -> SpeedupInterval:
    """The interval of log speedup from variance terms (variance, df), plus one pass effect for
    each side. Never narrower than without it: a well-measured pass term raises the
    Welch-Satterthwaite df, which could otherwise shrink t by more than the variance grows."""
    half = _half_width(terms, confidence)
    if pass_noise is not None and pass_noise.variance > 0:
        half = max(half, _half_width([*terms, (2 * pass_noise.variance, pass_noise.df)], confidence))
    return SpeedupInterval(speedup, speedup * math.exp(-half), speedup * math.exp(half))


def _log_mean_variance(samples: np.ndarray) -> float:
    """The variance of log(mean) via the delta method."""
    return float(samples.var(ddof=1)) / (len(samples) * float(samples.mean()) ** 2)


def speedup_interval(baseline_seconds: Sequence[float], setting_seconds: Sequence[float],
                     confidence: float = 0.95, speedup: float | None = None,
                     pooled: bool = False, pass_noise: PassNoise | None = None) -> SpeedupInterval:
    """The speedup of `setting_seconds` over `baseline_seconds` (per-batch seconds per image).

    `speedup` is the point estimate to centre on (the ratio of totals, which weighs a short last
    batch by its size); by default the ratio of the per-batch means. `pooled` assumes one timing
    noise for both sides (see the module docstring). `pass_noise` adds a pass effect per side.
    """
    base = np.asarray(baseline_seconds, dtype=np.float64)
    fast = np.asarray(setting_seconds, dtype=np.float64)
    if speedup is None:
        speedup = float(base.mean() / fast.mean())
    if pooled:
        return _pooled_interval(base, fast, confidence, speedup, pass_noise)
    if len(base) < 2 or len(fast) < 2:
        return SpeedupInterval(speedup, None, None)
    terms = [(_log_mean_variance(side), len(side) - 1) for side in (base, fast)]
    return _with_passes(speedup, terms, confidence, pass_noise)


def rounds_interval(ratios: Sequence[float], confidence: float = 0.95) -> SpeedupInterval:
    """The speedup of paired rounds (each round's baseline over setting seconds, timed A B B A so a
    linear drift within the round cancels): the geometric mean of the ratios, with a Student-t
    interval over the rounds' log ratios (df = rounds - 1). Whatever a round shares — contention,
    clocks, heat — varies between rounds and so is in the interval, which batch-to-batch noise
    within one pass is not. One round gives no interval."""
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    speedup = float(math.exp(logs.mean()))
    if len(logs) < 2:
        return SpeedupInterval(speedup, None, None)
    spread = float(logs.std(ddof=1))
    if spread == 0:
        return SpeedupInterval(speedup, speedup, speedup)
    half = t_quantile(confidence, len(logs) - 1) * spread / math.sqrt(len(logs))
    return SpeedupInterval(speedup, speedup * math.exp(-half), speedup * math.exp(half))


def _pooled_interval(base: np.ndarray, fast: np.ndarray, confidence: float,
                     speedup: float, pass_noise: PassNoise | None) -> SpeedupInterval:
    """One variance of log batch seconds from both sides; needs 3 batches in all."""
    df = len(base) + len(fast) - 2
    if df < 1 or not len(base) or not len(fast):
        return SpeedupInterval(speedup, None, None)
    logs_b, logs_s = np.log(base), np.log(fast)
    squares = float(((logs_b - logs_b.mean()) ** 2).sum() + ((logs_s - logs_s.mean()) ** 2).sum())
    variance = squares / df * (1 / len(base) + 1 / len(fast))
    return _with_passes(speedup, [(variance, df)], confidence, pass_noise)


def first_batch_interval(reference_seconds: Sequence[float], first_seconds: float,
                         excess: Sequence[float], confidence: float,
                         pass_noise: PassNoise | None = None) -> SpeedupInterval:
    """The speedup over `reference_seconds` (per-batch seconds of the baseline, or of another
    trial) of a setting measured by one batch, from `excess`: earlier trials' first batch minus
    the mean of their later ones (log seconds, the same device). A first batch is corrected by
    the record's mean when first batches run slow, never the other way: the record holds only
    trials that ran a 2nd batch, and a first-batch look stops some whose first batch was slow,
    so a record mean under 0 may be that selection, not the device. The interval is the record's
    prediction interval for one more trial (its spread about the correction, * sqrt(1 + 1/m)),
    with the reference's own noise added (Welch-Satterthwaite df)."""
    reference = np.asarray(reference_seconds, dtype=np.float64)
    record = np.asarray(excess, dtype=np.float64)
    m, n = len(record), len(reference)
    shift = max(0.0, float(record.mean())) if m else 0.0
    speedup = float(reference.mean()) / (first_seconds * math.exp(-shift))
    if m < 2:
        return SpeedupInterval(speedup, None, None)
    var_first = float(((record - shift) ** 2).sum()) / (m - 1) * (1 + 1 / m)
    terms = [(var_first, m - 1)]
    if n >= 2:
        terms.append((float(np.log(reference).var(ddof=1)) / n, n - 1))
    return _with_passes(speedup, terms, confidence, pass_noise)
