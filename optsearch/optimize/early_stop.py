"""Early stop: end a trial as soon as its partial measurement shows it cannot be the answer.

`rule_for(spec, trials, fingerprint, baseline_id)` builds the rule for the next trial from what the
study has measured so far; the worker hands it to `Evaluator.compare`, which calls it after every
batch. After `min_batches` batches, a trial is stopped when one of these one-sided questions is
answered with confidence:

- "quality":   its quality interval lies entirely past the limit (max-speedup and pareto);
- "speedup":   its speedup interval lies entirely below the target (target-speedup);
- "dominated": its speedup lies below the best feasible speedup measured so far on the same device
               fingerprint by more than `[search] stop_margin` (5 % by default: a near-tie runs
               on, since the best is the maximum of many noisy trials and a pruned trial is never
               confirmed), the best being feasible under the "bound" rule whatever the spec's
               and its figure lowered for being the largest of k noisy trials (below); or a
               feasible front member beats both its intervals (pareto).
               Never for a steps-only trial: that is the fewer-steps reference line.
- "inert":     its first batch computed everything (`compute_fraction` 1.0: a cache whose
               threshold never triggered): the baseline with hook overhead, stopped at once.
- "same images": its images so far are bit-identical, prompt by prompt, to those of a complete
               trial of its combo on the same device and batch size (a neighbouring threshold
               that makes the same skips): that computation again, whose figures are known; a
               second reading of it could only win by timing luck (benchmarks/twins.py: a third
               of a tiny-flux study's complete trials were such repeats).

Why each piece is there:
- Looks after every batch share alpha = 1 - confidence on their real correlation (Pocock's
  boundary, `sequential.per_look_alpha`), not alpha / looks: the estimate after 6 batches is mostly
  the one after 5, so Bonferroni is needlessly strict.
- "dominated" compares two noisy speedups, so their noises add in quadrature on the log scale.
  When the best was timed against the same baseline timing (`best_batch_seconds`), the look
  compares the two trials' own seconds and the baseline's noise cancels.
- The best is the maximum of the k feasible trials it was picked from: when they are at par its
  figure reads high by about its standard error times the expected maximum of k standard normals
  (`selected_maximum_shift`: 0 for k = 1, 1.2 for 5, 1.5 for 10). The look takes that off the
  best's figure first, the worst case (all k at par), so a near-tie with a lucky best runs on.
  benchmarks/search_cost.py replays how often the true winner is stopped, with and without it.
- The speedup interval pools the trial's timing noise with the baseline's: after 2 batches a
  trial alone has one degree of freedom and would never decide.
- After the first batch a trial has no noise of its own. The first look then uses the device's
  record of how first batches read against later ones (`FirstBatches`), and waits for a 2nd batch
  until 5 trials of its kind (after a warm-up or not) are on record.
- The quality interval is the t interval of the prompts measured so far, not narrowed for a finite
  set: prompts come in one fixed order, so a prefix is not a random sample of them.
- With 5 trials measured on all prompts, the quality look first removes each prompt's own effect
  (`PromptEffects`): how hard a prompt is is shared by every setting and dominates the spread
  between prompts, so one or two prompts can already decide.

benchmarks/quality_look.py and benchmarks/search_cost.py measure how often the looks miss and how
much device time they save (benchmarks/RESULTS.md, "Search cost").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from optsearch.measure.metrics import (
    Interval,
    at_least_as_good,
    best_case,
    past_limit,
    quality_margin,
    unsafe_side,
)
from optsearch.measure.speedup import SpeedupInterval, first_batch_interval, speedup_interval
from optsearch.optimize.evidence import RECENT_TRIALS, FirstBatches, PromptEffects
from optsearch.optimize.objectives import is_feasible
from optsearch.optimize.sequential import per_look_alpha
from optsearch.storage.record import is_copy, made_images, per_prompt_key, quality_of, speedup_of
from optsearch.study_spec import StudySpec

QUALITY, SPEEDUP, DOMINATED, INERT = "quality", "speedup", "dominated", "inert"
SAME_IMAGES = "same images"
STEPS_ONLY = "steps"  # the combo of the fewer-steps reference line (optimize/reference.py)
REASONS = (QUALITY, SPEEDUP, DOMINATED, INERT, SAME_IMAGES)


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
    min_batches: int = 1
    speedup_after: int = 1  # the first batch a speedup look may come after (2: not the first)
    first_batches: FirstBatches | None = None  # the device's first-batch record (the 1st look)
    quality_limit: float | None = None  # max-speedup and pareto
    target_speedup: float | None = None  # target-speedup
    speedup_to_beat: SpeedupInterval | None = None  # max-speedup: the best feasible so far
    best_batch_seconds: Sequence[float] | None = None  # the best's, when timed on this baseline
    stop_margin: float = 0.0  # "dominated" only when slower than the best by more than this share
    best_selected_from: int = 1  # how many feasible trials the best is the maximum of
    front: list[FrontPoint] = field(default_factory=list)  # pareto: the feasible front
    prompt_effects: PromptEffects | None = None  # from earlier trials measured on every prompt
    boundary: str = "pocock"  # per-look alpha; "bonferroni" (alpha / looks) for the benchmarks
    # "same images": the complete trials of this combo and device (their attrs), and what this
    # trial is ({"fingerprint", "combo"}; its batch size and images come with each look)
    computed: list[dict] = field(default_factory=list)
    identity: dict = field(default_factory=dict)

    def __call__(self, partial) -> str | None:
        if partial.compute_fractions and partial.compute_fractions[0] >= 1.0:
            return INERT  # nothing skipped: the baseline plus the hooks' overhead
        if partial.batches_evaluated < self.min_batches or not partial.images_evaluated:
            return None
        so_far = {**self.identity, "batch_size": partial.batch_size,
                  "image_digests": partial.image_digests}
        if any(made_images(other, so_far) for other in self.computed):
            return SAME_IMAGES
        alpha = self._quality_alpha(partial)  # per look, on the one side asked
        per_look = 1 - 2 * alpha  # a two-sided interval whose each end is a (1 - alpha) bound
        quality = self._quality(partial.per_prompt(self.metric), per_look, partial.num_samples)
        if self.quality_limit is not None and past_limit(quality, self.metric, self.quality_limit):
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
                                           excess, per_look, partial.pass_noise)
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
        confidence = partial.confidence
        normal = NormalDist()
        best_se = math.log(best.speedup / best.low) / normal.inv_cdf(0.5 + confidence / 2)
        # the best's figure, lowered for being the largest of k: a margin the trial must clear too
        margin = math.log(1 + self.stop_margin) + best_se * selected_maximum_shift(
            self.best_selected_from)
        if self.best_batch_seconds is not None and len(self.best_batch_seconds) >= 2:
            # one baseline timing under both: the trial's speedup over the best is theirs, the
            # baseline cancels; the pooled interval of its seconds against the best's (log-centred)
            best_seconds, trial_seconds = self.best_batch_seconds, partial.batch_seconds
            if len(trial_seconds) == 1:
                over_best = first_batch_interval(best_seconds, trial_seconds[0],
                                                 self._first_batch_excess(partial), 1 - 2 * alpha,
                                                 partial.pass_noise)
                return math.log(over_best.high) < -margin
            centre = math.exp(np.log(best_seconds).mean() - np.log(trial_seconds).mean())
            over_best = speedup_interval(best_seconds, trial_seconds, 1 - 2 * alpha, centre,
                                         pooled=True, pass_noise=partial.pass_noise)
            return math.log(over_best.high) < -margin
        trial_half = math.log(trial.high / trial.speedup)
        best_half = best_se * normal.inv_cdf(1 - alpha)
        return (math.log(trial.speedup) + math.hypot(trial_half, best_half)
                < math.log(best.speedup) - margin)

    def _better(self, safe: float, trial: Interval) -> bool:
        """Is a front member's safe-side quality better than the trial's best case?"""
        return not at_least_as_good(best_case(trial, self.metric), safe, self.metric)


def selected_maximum_shift(k: int) -> float:
    """The expected maximum of k independent standard normals (Blom's approximation; 0 for k = 1):
    how many standard errors the largest of k trials at par reads above their common figure."""
    if k <= 1:
        return 0.0
    return NormalDist().inv_cdf((k - 0.375) / (k + 0.25))


def rule_for(spec: StudySpec, trials: Sequence[FrozenTrial], fingerprint: str,
             baseline_id: str | None = None, combo: str | None = None) -> EarlyStop | None:
    """The early-stop rule for the next trial on `fingerprint`, from the study's finished trials
    (COMPLETE and PRUNED); None when the spec turns early stop off. `baseline_id` is the worker's
    current baseline timing: a best timed against it is compared by its own seconds. A steps-only
    trial (`combo` "steps") is the fewer-steps reference line, which every claim is compared
    with: it is never stopped as dominated, only when its quality is past the limit."""
    if not spec.search.early_stop:
        return None
    here = [t for t in trials if t.user_attrs.get("fingerprint") == fingerprint]
    rule = EarlyStop(spec.quality.metric, spec.search.min_batches,
                     stop_margin=spec.search.stop_margin)
    measured = [t for t in here if not is_copy(t) and t.user_attrs.get("batch_seconds")]
    rule.first_batches = FirstBatches.of(
        (t.user_attrs["batch_seconds"], (t.user_attrs.get("warmup_seconds") or 0) > 0)
        for t in measured[-RECENT_TRIALS:])
    rule.identity = {"fingerprint": fingerprint, "combo": combo}
    rule.computed = [t.user_attrs for t in measured
                     if t.state == TrialState.COMPLETE and t.user_attrs.get("combo") == combo]
    mode = spec.objective.mode
    if mode == "target-speedup":
        rule.target_speedup = spec.objective.target_speedup
        return rule
    rule.quality_limit = spec.quality.limit
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    key = per_prompt_key(spec.quality.metric)
    rule.prompt_effects = PromptEffects.of(
        [t.user_attrs[key] for t in complete if not is_copy(t)
         and len(t.user_attrs.get(key) or ()) == spec.prompts.num_samples][-RECENT_TRIALS:])
    found = [t for t in complete if t.user_attrs.get("fingerprint") == fingerprint
             and is_feasible(t) and t.user_attrs.get("speedup_low") is not None]
    if combo == STEPS_ONLY:
        return rule  # the reference line is measured to the end unless its quality fails
    # the best to beat must be feasible under the "bound" rule, whatever the spec's: a best that
    # only its lucky mean makes feasible would stop the trials that are
    metric, limit = spec.quality.metric, spec.quality.limit
    safe = [t for t in found if quality_margin(quality_of(t.user_attrs, metric) or Interval(
        math.nan, math.nan, math.nan), metric, limit, "bound") <= 0]
    if mode == "max-speedup" and safe:
        best = max(safe, key=lambda t: t.user_attrs["speedup"]).user_attrs
        rule.speedup_to_beat = speedup_of(best)
        rule.best_selected_from = len(safe)
        if baseline_id is not None and best.get("baseline_id") == baseline_id:
            rule.best_batch_seconds = best.get("batch_seconds")
    if mode == "pareto":
        for trial in found:
            safe = unsafe_side(quality_of(trial.user_attrs, spec.quality.metric),
                               spec.quality.metric, "bound")
            if math.isfinite(safe):
                rule.front.append(FrontPoint(trial.user_attrs["speedup_low"], safe))
    return rule
