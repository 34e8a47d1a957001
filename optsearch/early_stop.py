"""Early stop: end a trial as soon as its partial measurement shows it cannot be the answer.

After `min_batches` timed batches (1 by default; a speedup look after the first batch also needs
the device's first-batch record, see below), a trial is stopped when, at a per-look confidence
corrected for looking after every batch, all of it on the one side each rule asks about (each
asks a one-sided question: is this end past that line?):

- "quality":   its quality interval lies entirely past the limit (max-speedup and pareto);
- "speedup":   its speedup interval lies entirely below the target (target-speedup);
- "dominated": its speedup lies below the best feasible speedup measured so far on the same
               device fingerprint, with both measurements' noise (max-speedup), or some feasible
               front member beats both its intervals (pareto).

The per-look alpha is sequential (`sequential.per_look_alpha`, Pocock's boundary): each rule's
looks share alpha = 1 - confidence on their real correlation (the estimate after 6 batches is
mostly the one after 5), not Bonferroni's alpha / looks: 0.0137 instead of 0.0071 per look for the
7 looks of a default study. On the recorded landscapes no trial's looks missed its final mean more
often than alpha, and the replayed studies reached the answer with 7 % less device time
(benchmarks/RESULTS.md 10f).

A trial that could still become the answer is not stopped. In max-speedup that question is about
the difference of two noisy speedups, the trial's and the best's, so the rule adds their noise in
quadrature (on the log scale, where a ratio is a difference): stop when log(trial) +
sqrt(h_trial^2 + h_best^2) < log(best), h_trial being the trial's one-sided (1 - alpha) half-width
and h_best the best's recorded half-width rescaled to the same alpha (its recorded bound used a t
quantile >= the normal one, so the rescaled width never understates its noise). Comparing the
trial's optimistic end with the best's *lower bound* instead adds the two widths and kept trials
within a few percent of the best running to their last batch (benchmarks/RESULTS.md 10e). When
the best was timed against the same baseline timing as the trial (`best_batch_seconds`: one worker
between two re-timings), both speedups divide by the same figure, so the look compares the two
trials' own batch seconds and the baseline's noise cancels (10f). Pareto
compares with each front member's conservative end (its lower speedup bound, its safe-side quality
bound).

The quality interval is the t interval of the prompts' mean from those measured so far. It is not
narrowed by the share of the study's prompts already known (a finite-population correction): the
prompts come in the same fixed order for every trial, not in a random one, and where a late prompt
is much easier or harder than the first ones every trial's final mean lands outside the narrowed
interval (on the 16-prompt landscape it missed 1.8 % of looks at an alpha of 0.6 %; unnarrowed, none:
benchmarks/RESULTS.md 10e). If the prompts' mean lies past the limit, the trial fails under rule
"mean" and, its bound being further out, under rule "bound" too.

Once the study has 5 trials measured on all its prompts, the quality look removes the prompts'
own effects first ("prompt effects"): how hard a prompt is (its PSNR, its CLIP loss)
is mostly a property of the prompt, shared by every setting, and dominates the spread between a
trial's prompts (on the recorded CPU landscape the residual spread is about a quarter of it). With
x = a trial's per-prompt values and a = each prompt's mean deviation from its trial's mean over
the earlier trials, the final mean is estimated as mean(x - a) over the prompts measured so far,
and the residual variance is the 90th percentile of the K earlier trials' own (it differs about 2x
between trials; the pooled one undercovered on the 3-prompt landscape), with df = (K - 1)(N - 1),
so one or two prompts can already decide. Checked on the three recorded landscapes
(benchmarks/quality_look.py): the one-sided bound misses the final mean at most as often as its
alpha for K >= 5 (the pooled variance missed 2.6-4.4 % of looks at an alpha of 1.7 %).

The trial's speedup interval here pools the timing noise of its batches with the baseline's
(`speedup_interval(pooled=True)`): after 2 batches the unpooled interval has about one degree of
freedom and would never decide, so every dominated trial would run to its last batch.

After the first batch a trial has no noise of its own to pool: one slow batch (5 % of this CPU's
batches are > 15 % outliers) or a first batch slowed by what a warm-up did not cover (new shapes,
allocations: on a GPU) would read as a slow setting. So the first-batch look uses what the study
measured on this device ("first-batch record", `FirstBatches`): for each earlier trial that ran
two batches or more, how far its first batch read from the mean of its others (log seconds),
kept apart for trials after a warm-up and without one. The trial's log seconds are its first
batch's less the record's mean where first batches run slow (never more: the record holds only
trials that ran a 2nd batch, which leans it fast), with the record's spread as a prediction
interval (`speedup.first_batch_interval`); without 5 such trials of its kind the first speedup look waits
for the 2nd batch. On the recorded landscapes this stops dominated trials one batch sooner with
no answer lost (benchmarks/RESULTS.md 10g).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from .quality import Interval, t_quantile
from .sequential import per_look_alpha
from .speedup import SpeedupInterval, first_batch_interval, speedup_interval

QUALITY, SPEEDUP, DOMINATED = "quality", "speedup", "dominated"
REASONS = (QUALITY, SPEEDUP, DOMINATED)


@dataclass(frozen=True)
class FrontPoint:
    """A feasible trial already measured: its lower speedup bound and its safe-side quality bound."""

    speedup_low: float
    quality_safe: float  # the high end of a loss, the low end of PSNR/SSIM


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


@dataclass
class EarlyStop:
    """The rule a worker hands to `Evaluator.compare`: call it with the partial comparison; it
    returns the reason to stop, or None to go on."""

    metric: str
    min_batches: int = 1
    speedup_after: int = 1  # the first batch a speedup look may come after (2: not the first)
    first_batches: FirstBatches | None = None  # the device's first-batch record (the 1st look)
    quality_limit: float | None = None  # max-speedup and pareto
    target_speedup: float | None = None  # target-speedup
    speedup_to_beat: SpeedupInterval | None = None  # max-speedup: the best feasible so far
    best_batch_seconds: Sequence[float] | None = None  # the best's, when timed on this baseline
    front: list[FrontPoint] = field(default_factory=list)  # pareto: the feasible front
    prompt_effects: PromptEffects | None = None  # from earlier trials measured on every prompt
    boundary: str = "pocock"  # per-look alpha; "bonferroni" (alpha / looks) for the benchmarks

    def __call__(self, partial) -> str | None:
        if partial.batches_evaluated < self.min_batches or not partial.images_evaluated:
            return None
        alpha = self._quality_alpha(partial)  # per look, on the one side asked
        per_look = 1 - 2 * alpha  # a two-sided interval whose each end is a (1 - alpha) bound
        quality = self._quality(partial.per_prompt(self.metric), per_look, partial.num_samples)
        if self.quality_limit is not None and _past_limit(quality, self.metric, self.quality_limit):
            return QUALITY
        if self.target_speedup is None and self.speedup_to_beat is None and not self.front:
            return None
        excess = self._first_batch_excess(partial)
        first_look = max(self.min_batches, self.speedup_after, 1 if excess is not None else 2)
        if partial.batches_evaluated < first_look:
            return None  # a first batch can be slow (new shapes, caches): see its own noise first
        alpha = self._look_alpha(1 - partial.confidence, range(first_look, partial.n_batches))
        per_look = 1 - 2 * alpha
        if partial.batches_evaluated == 1:
            speedup = first_batch_interval(partial.baseline_batch_seconds, partial.batch_seconds[0],
                                           excess, per_look)
        else:
            speedup = partial.speedup_interval_at(per_look, pooled=True)
        if speedup.high is None:
            return None
        if self.target_speedup is not None and speedup.high < self.target_speedup:
            return SPEEDUP
        if self._below_best(speedup, partial, alpha):
            return DOMINATED
        if any(point.speedup_low > speedup.high and self._better(point.quality_safe, quality)
               for point in self.front):
            return DOMINATED
        return None

    def _quality_alpha(self, partial) -> float:
        """The quality look's alpha: its looks are at the prompts measured after each batch but the
        last; with prompt effects they estimate the mean of the study's fixed prompts."""
        prompts = [min(k * partial.batch_size, partial.num_samples)
                   for k in range(max(self.min_batches, 1), partial.n_batches)]
        effects = self.prompt_effects
        fixed_set = effects is not None and len(effects.effects) == partial.num_samples
        return self._look_alpha(1 - partial.confidence, prompts,
                                partial.num_samples if fixed_set else None)

    def _look_alpha(self, alpha: float, looks, total: int | None = None) -> float:
        looks = list(looks)
        if self.boundary == "bonferroni":
            return alpha / max(1, len(looks))
        return per_look_alpha(alpha, looks, total)

    def _first_batch_excess(self, partial) -> tuple[float, ...] | None:
        """The device's first-batch record for this trial's kind (warmed up or not), if long enough."""
        if self.first_batches is None:
            return None
        return self.first_batches.excess(partial.warmup_seconds > 0)

    def _quality(self, values, confidence: float, num_samples: int) -> Interval:
        effects = self.prompt_effects
        if effects is not None and len(effects.effects) == num_samples:
            return effects.interval(values, confidence)
        return Interval.of(values, confidence)

    def _below_best(self, trial: SpeedupInterval, partial, alpha: float) -> bool:
        """Is the trial slower than the best, one-sided at alpha, counting both figures' noise?"""
        best = self.speedup_to_beat
        if best is None or best.low is None or best.low <= 0:
            return False
        if self.best_batch_seconds is not None and len(self.best_batch_seconds) >= 2:
            # one baseline timing under both: the trial's speedup over the best is theirs, the
            # baseline cancels; the pooled interval of its seconds against the best's (log-centred)
            best_seconds, trial_seconds = self.best_batch_seconds, partial.batch_seconds
            if len(trial_seconds) == 1:
                over_best = first_batch_interval(best_seconds, trial_seconds[0],
                                                 self._first_batch_excess(partial), 1 - 2 * alpha)
                return over_best.high < 1
            centre = math.exp(np.log(best_seconds).mean() - np.log(trial_seconds).mean())
            over_best = speedup_interval(best_seconds, trial_seconds, 1 - 2 * alpha, centre, pooled=True)
            return over_best.high < 1
        confidence = partial.confidence
        normal = NormalDist()
        trial_half = math.log(trial.high / trial.speedup)
        best_half = (math.log(best.speedup / best.low) * normal.inv_cdf(1 - alpha)
                     / normal.inv_cdf(0.5 + confidence / 2))
        return math.log(trial.speedup) + math.hypot(trial_half, best_half) < math.log(best.speedup)

    def _better(self, safe: float, trial: Interval) -> bool:
        """Is a front member's safe-side quality better than the trial's best case?"""
        return safe < trial.low if self.metric == "clip_loss" else safe > trial.high


def _past_limit(interval: Interval, metric: str, limit: float) -> bool:
    """The whole interval lies on the wrong side of the limit (fails under either rule)."""
    if metric == "clip_loss":
        return interval.low > limit
    return interval.high < limit
