"""What earlier trials measured that sharpens the next trial's early-stop looks.

- `PromptEffects`: how hard each prompt is (its mean deviation from its trial's mean) is shared by
  every setting and dominates the spread between prompts; removing it lets one or two prompts
  decide. Learned from 5 or more trials measured on all the study's prompts.
- `FirstBatches`: how far a first batch reads from its trial's later ones on this device, after a
  warm-up and without one; the noise of the speedup look after one batch.

Both are learned from the latest `RECENT_TRIALS` trials only: a few hundred pin them down, and
the whole history made every trial's early-stop rule grow with the study (88 ms at 5,000 trials,
benchmarks/RESULTS.md "Scaling out").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from optsearch.measure.metrics import Interval, t_quantile

RECENT_TRIALS = 200


@dataclass(frozen=True)
class PromptEffects:
    """What earlier trials measured on every prompt: each prompt's effect (its mean deviation from
    its trial's mean) and each trial's residual variance after removing both."""

    effects: np.ndarray
    residual_variances: np.ndarray  # one per earlier trial

    MIN_TRIALS = 5  # fewer: the spread of residual variances between trials is not known yet
    SPREAD_QUANTILE = 90  # residual variance differs 2x between trials: assume a scattered one

    @classmethod
    def of(cls, rows: Sequence[Sequence[float]]) -> PromptEffects | None:
        """From the per-prompt values of earlier trials (each row all the study's prompts); None
        with fewer than MIN_TRIALS rows."""
        table = np.asarray(rows, dtype=np.float64)
        if (table.ndim != 2 or len(table) < cls.MIN_TRIALS or table.shape[1] < 2
                or not np.isfinite(table).all()):
            return None
        deviations = table - table.mean(axis=1, keepdims=True)
        effects = deviations.mean(axis=0)
        trials, prompts = table.shape
        per_trial_df = (prompts - 1) * (trials - 1) / trials
        return cls(effects, ((deviations - effects) ** 2).sum(axis=1) / per_trial_df)

    def interval(self, values: Sequence[float], confidence: float) -> Interval:
        """The interval of the trial's mean over all the prompts, from its first len(values)."""
        adjusted = np.asarray(values, dtype=np.float64) - self.effects[:len(values)]
        n, total, trials = len(adjusted), len(self.effects), len(self.residual_variances)
        mean = float(adjusted.mean())
        variance = float(np.percentile(self.residual_variances, self.SPREAD_QUANTILE))
        if n >= 3:  # a trial that scatters more than the earlier ones widens its own interval
            variance = max(variance, float(adjusted.var(ddof=1)))
        # the unknown prompts' residuals, and the effects' own error from `trials` rows
        variance *= max(0.0, 1 / n - 1 / total) * (1 + 1 / trials)
        half = t_quantile(confidence, (trials - 1) * (total - 1)) * math.sqrt(variance)
        return Interval(mean, mean - half, mean + half)


@dataclass(frozen=True)
class FirstBatches:
    """How far earlier trials' first batch read from the mean of their later ones (log seconds, on
    one device fingerprint), after a warm-up and without one: the first-batch look's noise."""

    after_warmup: tuple[float, ...] = ()
    without_warmup: tuple[float, ...] = ()

    MIN_TRIALS = 5  # fewer: the spread of first batches on this device is not known yet

    @classmethod
    def of(cls, trials: Iterable[tuple[Sequence[float], bool]]) -> FirstBatches:
        """From (batch seconds, warmed up) of earlier trials; those with one batch say nothing."""
        record: dict[bool, list[float]] = {True: [], False: []}
        for seconds, warmed in trials:
            logs = np.log(np.asarray(seconds, dtype=np.float64))
            if len(logs) >= 2 and np.isfinite(logs).all():
                record[bool(warmed)].append(float(logs[0] - logs[1:].mean()))
        return cls(tuple(record[True]), tuple(record[False]))

    def excess(self, warmed: bool) -> tuple[float, ...] | None:
        """The record for a trial that did (not) warm up; None while it is too short."""
        record = self.after_warmup if warmed else self.without_warmup
        return record if len(record) >= self.MIN_TRIALS else None
