"""Early stop: end a trial as soon as its partial measurement shows it cannot be the answer.

After `min_batches` timed batches, a trial is stopped when, at a per-look confidence corrected for
looking after every batch (Bonferroni: alpha / n_batches per look, all of it on the one side each
rule asks about, since each asks a one-sided question: is this end past that line?):

- "quality":   its quality interval lies entirely past the limit (max-speedup and pareto);
- "speedup":   its speedup interval lies entirely below the target (target-speedup);
- "dominated": its speedup interval lies entirely below the lower bound of the best feasible
               speedup measured so far on the same device fingerprint (max-speedup), or some
               feasible front member beats both its intervals (pareto).

The comparison is always with the *conservative* end of what was already found (its lower speedup
bound, its safe-side quality bound) and the *optimistic* end of the trial, so a trial that could
still become the answer is not stopped.

The quality interval is that of the mean over the study's `num_samples` prompts, the figure the
feasibility rule will check (a finite-population correction: after 6 of 8 prompts only 2 are
unknown). If that final mean lies past the limit, the trial fails under rule "mean" and, its bound
being further out, under rule "bound" too.

The trial's speedup interval here pools the timing noise of its batches with the baseline's
(`speedup_interval(pooled=True)`): after 2 batches the unpooled interval has about one degree of
freedom and would never decide, so every dominated trial would run to its last batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .quality import Interval

QUALITY, SPEEDUP, DOMINATED = "quality", "speedup", "dominated"
REASONS = (QUALITY, SPEEDUP, DOMINATED)


@dataclass(frozen=True)
class FrontPoint:
    """A feasible trial already measured: its lower speedup bound and its safe-side quality bound."""

    speedup_low: float
    quality_safe: float  # the high end of a loss, the low end of PSNR/SSIM


@dataclass
class EarlyStop:
    """The rule a worker hands to `Evaluator.compare`: call it with the partial comparison; it
    returns the reason to stop, or None to go on."""

    metric: str
    min_batches: int = 2
    quality_limit: float | None = None  # max-speedup and pareto
    target_speedup: float | None = None  # target-speedup
    speedup_to_beat: float | None = None  # max-speedup: best feasible speedup's lower bound
    front: list[FrontPoint] = field(default_factory=list)  # pareto: the feasible front

    def __call__(self, partial) -> str | None:
        if partial.batches_evaluated < self.min_batches or partial.images_evaluated < 2:
            return None
        alpha = (1 - partial.confidence) / partial.n_batches  # per look, on the one side asked
        per_look = 1 - 2 * alpha  # a two-sided interval whose each end is a (1 - alpha) bound
        quality = Interval.of(partial.per_prompt(self.metric), per_look, partial.num_samples)
        if self.quality_limit is not None and _past_limit(quality, self.metric, self.quality_limit):
            return QUALITY
        if self.target_speedup is None and self.speedup_to_beat is None and not self.front:
            return None
        speedup = partial.speedup_interval_at(per_look, pooled=True)
        if speedup.high is None:
            return None
        if self.target_speedup is not None and speedup.high < self.target_speedup:
            return SPEEDUP
        if self.speedup_to_beat is not None and speedup.high < self.speedup_to_beat:
            return DOMINATED
        if any(point.speedup_low > speedup.high and self._better(point.quality_safe, quality)
               for point in self.front):
            return DOMINATED
        return None

    def _better(self, safe: float, trial: Interval) -> bool:
        """Is a front member's safe-side quality better than the trial's best case?"""
        return safe < trial.low if self.metric == "clip_loss" else safe > trial.high


def _past_limit(interval: Interval, metric: str, limit: float) -> bool:
    """The whole interval lies on the wrong side of the limit (fails under either rule)."""
    if metric == "clip_loss":
        return interval.low > limit
    return interval.high < limit
