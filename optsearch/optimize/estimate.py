"""What the rest of a study costs, from one measured seconds-per-image and, once the study has
finished trials, what they cost: the line `check`, `run` and `worker` print before trials start."""

from __future__ import annotations

import math
from dataclasses import dataclass

from optuna.trial import TrialState

from optsearch.formatting import format_duration
from optsearch.measure.compiling import compiled_as

# Trials run between the baseline's speed (1x: nothing gained) and about twice as fast (what
# DeepCache, TaylorSeer or half the steps give at the limits studies set): an honest range.
# Fewer steps are counted apart (`expected_speedups`): a LoRA at 4 of 50 steps runs some 12x.
EXPECTED_SPEEDUPS = (1.0, 2.0)


def expected_speedups(spec) -> tuple[float, float]:
    """The (slow, fast) speedup of an average trial of `spec`: each combo's families at 1x-2x
    (`EXPECTED_SPEEDUPS`; steps alone at 1x), times model.steps over the most and the fewest
    steps it draws where it runs `steps`. Combos count alike, as a trial's seconds (1/speedup)."""
    slow, fast = [], []
    for combo in spec.search.combos:
        low, high = EXPECTED_SPEEDUPS if set(combo) - {"steps"} else (1.0, 1.0)
        if "steps" in combo:
            counts = spec.step_counts(combo)
            low, high = (low * spec.model.steps / max(counts), high * spec.model.steps / min(counts))
        slow.append(low)
        fast.append(high)
    if not slow:
        return EXPECTED_SPEEDUPS
    return len(slow) / sum(1 / x for x in slow), len(fast) / sum(1 / x for x in fast)


MEASURED_AT_LEAST = 3  # finished trials before their own cost replaces the 1x-2x assumption


def measured_passes(trials, num_samples: int, seconds_per_image: float) -> tuple[float, float, int] | None:
    """What a finished trial of this study has cost, in passes of its baseline (`num_samples` x
    the baseline's s/image its record names, else `seconds_per_image`): wall seconds from start
    to end, so warm-up, scoring, early stops and free copies are in it. (low, high) of the mean,
    +-2 standard errors, and how many trials; None under MEASURED_AT_LEAST."""
    passes = [(trial.datetime_complete - trial.datetime_start).total_seconds()
              / (num_samples * (trial.user_attrs.get("baseline_seconds_per_image") or seconds_per_image))
              for trial in trials if trial.datetime_start and trial.datetime_complete]
    if len(passes) < MEASURED_AT_LEAST:
        return None
    mean = sum(passes) / len(passes)
    error = 2 * math.sqrt(sum((p - mean) ** 2 for p in passes) / (len(passes) - 1) / len(passes))
    return max(mean - error, min(passes)), mean + error, len(passes)


@dataclass
class Estimate:
    """The study's duration from one measured seconds-per-image, for 1 and `workers` workers."""

    seconds_per_image: float
    n_trials: int
    num_samples: int
    workers: int = 1
    compile_seconds: float = 0.0  # a compiled pipeline's untimed warm-up, which every trial runs
    calibration_images: float = 0.0  # "auto" ranges' plain calls before the first trial, in images
    speedups: tuple[float, float] = EXPECTED_SPEEDUPS  # an average trial's, slow and fast
    measured: tuple[float, float, int] | None = None  # `measured_passes`: replaces `speedups`

    @property
    def calibration_seconds(self) -> float:
        return self.calibration_images * self.seconds_per_image

    def per_trial(self, speedup: float) -> float:
        """One trial: a short warm-up plus every prompt at `speedup`, scoring not counted; a
        compiled pipeline's full warm-up (its compile included) besides."""
        return self.num_samples * self.seconds_per_image / speedup * 1.1 + self.compile_seconds

    def trial_seconds(self) -> tuple[float, float]:
        """(fastest, slowest) trial: as the study's trials measured so far cost, else assumed."""
        if self.measured is not None:
            low, high, _ = self.measured
            return low * self.baseline_seconds, high * self.baseline_seconds
        return self.per_trial(self.speedups[1]), self.per_trial(self.speedups[0])

    @property
    def baseline_seconds(self) -> float:
        return self.num_samples * self.seconds_per_image

    def total(self, workers: int) -> tuple[float, float]:
        """(fastest, slowest) wall seconds: each worker times its own baseline, then shares the
        trials; trials are whole units, so the slowest worker takes the rounded-up share."""
        share = math.ceil(self.n_trials / workers)
        fast, slow = (self.baseline_seconds + self.calibration_seconds + share * seconds
                      for seconds in self.trial_seconds())
        return fast, slow


def _about(seconds: float) -> str:
    """'~12 s', or '<1 s'."""
    text = format_duration(seconds)
    return text if text.startswith("<") else f"~{text}"


def estimate_text(estimate: Estimate) -> str:
    """One line: the study's duration on 1 worker and on N, trials x prompts x s/image."""
    low, high = estimate.total(1)
    text = (f"estimate: {estimate.n_trials} trials x {estimate.num_samples} prompts x "
            f"{estimate.seconds_per_image:.3g} s/image (the baseline's) " + _per_trial_text(estimate)
            + (f" + {estimate.compile_seconds:.3g} s compiling"
               if estimate.compile_seconds and estimate.measured is None else "")
            + (f", after {_about(estimate.calibration_seconds)} calibrating \"auto\" ranges"
               if estimate.calibration_images else "")
            + f": {format_duration(low)}-{format_duration(high)} on 1 worker")
    if estimate.workers > 1:
        low, high = estimate.total(estimate.workers)
        text += f", {format_duration(low)}-{format_duration(high)} on {estimate.workers}"
    return text + ("" if estimate.measured else " (early stop and reuse make it shorter)")


def _per_trial_text(estimate: Estimate) -> str:
    """How much of a baseline pass a trial takes: measured on the study's trials, or assumed."""
    if estimate.measured is not None:
        low, high, count = estimate.measured
        return (f"x {low:.2g}-{high:.2g} (a trial's cost in baseline passes, 95%, from the {count} "
                "trials finished so far: warm-up, scoring, early stops and copies in it)")
    return (f"/ a {estimate.speedups[0]:.3g}x-{estimate.speedups[1]:.3g}x speedup"
            + (" (the combos' fewer steps counted)" if estimate.speedups != EXPECTED_SPEEDUPS else ""))


def print_estimate(worker_id: str, baseline, remaining: int, evaluator, spec, study) -> None:
    """What a worker prints at start: the trials left and how long they should take here, from
    its `baseline` (a compiled pipeline's warm-up, which every trial runs untimed, included),
    the "auto" ranges' plain calls its `evaluator` still has to run, and what the `study`'s
    finished trials cost, once there are enough of them."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if remaining:
        compiled = compiled_as(evaluator.pipe) is not None
        estimate = Estimate(baseline.seconds_per_image, remaining, len(evaluator.prompts),
                            compile_seconds=baseline.warmup_seconds if compiled else 0.0,
                            calibration_images=evaluator.calibration_images(spec),
                            speedups=expected_speedups(spec),
                            measured=measured_passes(finished, len(evaluator.prompts),
                                                     baseline.seconds_per_image))
        print(f"{worker_id}: {remaining} trials to go; {estimate_text(estimate)}", flush=True)
