"""What the rest of a study costs, from one measured seconds-per-image: the line `check`, `run`
and `worker` print before trials start."""

from __future__ import annotations

import math
from dataclasses import dataclass

from optsearch.formatting import format_duration
from optsearch.measure.compiling import compiled_as

# Trials run between the baseline's speed (1x: nothing gained) and about twice as fast (what
# DeepCache, TaylorSeer or half the steps give at the limits studies set): an honest range.
EXPECTED_SPEEDUPS = (1.0, 2.0)


@dataclass
class Estimate:
    """The study's duration from one measured seconds-per-image, for 1 and `workers` workers."""

    seconds_per_image: float
    n_trials: int
    num_samples: int
    workers: int = 1
    compile_seconds: float = 0.0  # a compiled pipeline's untimed warm-up, which every trial runs
    calibration_images: float = 0.0  # "auto" ranges' plain calls before the first trial, in images

    @property
    def calibration_seconds(self) -> float:
        return self.calibration_images * self.seconds_per_image

    def per_trial(self, speedup: float) -> float:
        """One trial: a short warm-up plus every prompt at `speedup`, scoring not counted; a
        compiled pipeline's full warm-up (its compile included) besides."""
        return self.num_samples * self.seconds_per_image / speedup * 1.1 + self.compile_seconds

    @property
    def baseline_seconds(self) -> float:
        return self.num_samples * self.seconds_per_image

    def total(self, workers: int) -> tuple[float, float]:
        """(fastest, slowest) wall seconds: each worker times its own baseline, then shares the
        trials; trials are whole units, so the slowest worker takes the rounded-up share."""
        share = math.ceil(self.n_trials / workers)
        fast, slow = (self.baseline_seconds + self.calibration_seconds + share * self.per_trial(s)
                      for s in reversed(EXPECTED_SPEEDUPS))
        return fast, slow


def _about(seconds: float) -> str:
    """'~12 s', or '<1 s'."""
    text = format_duration(seconds)
    return text if text.startswith("<") else f"~{text}"


def estimate_text(estimate: Estimate) -> str:
    """One line: the study's duration on 1 worker and on N, trials x prompts x s/image."""
    low, high = estimate.total(1)
    text = (f"estimate: {estimate.n_trials} trials x {estimate.num_samples} prompts x "
            f"{estimate.seconds_per_image:.3g} s/image (the baseline's) / a {EXPECTED_SPEEDUPS[0]:g}x-"
            f"{EXPECTED_SPEEDUPS[1]:g}x speedup"
            + (f" + {estimate.compile_seconds:.3g} s compiling" if estimate.compile_seconds else "")
            + (f", after {_about(estimate.calibration_seconds)} calibrating \"auto\" ranges"
               if estimate.calibration_images else "")
            + f": {format_duration(low)}-{format_duration(high)} on 1 worker")
    if estimate.workers > 1:
        low, high = estimate.total(estimate.workers)
        text += f", {format_duration(low)}-{format_duration(high)} on {estimate.workers}"
    return text + " (early stop and reuse make it shorter)"


def print_estimate(worker_id: str, baseline, remaining: int, evaluator, spec) -> None:
    """What a worker prints at start: the trials left and how long they should take here, from
    its `baseline` (a compiled pipeline's warm-up, which every trial runs untimed, included) and
    the "auto" ranges' plain calls its `evaluator` still has to run."""
    if remaining:
        compiled = compiled_as(evaluator.pipe) is not None
        estimate = Estimate(baseline.seconds_per_image, remaining, len(evaluator.prompts),
                            compile_seconds=baseline.warmup_seconds if compiled else 0.0,
                            calibration_images=evaluator.calibration_images(spec))
        print(f"{worker_id}: {remaining} trials to go; {estimate_text(estimate)}", flush=True)
