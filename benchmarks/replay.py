"""What the replays share: the recorded landscapes (benchmarks/data/) and one trial replayed batch
by batch through optsearch's own Comparison and early-stop rule. A replay times nothing: its
figures do not depend on the machine it runs on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.common import ROOT
from optsearch.measure.comparison import Comparison
from optsearch.measure.metrics import Interval
from optsearch.measure.speedup import SpeedupInterval

# The DeepCache+ToMe+T-GATE grid every landscape records.
GRID = {
    "deepcache.cache_interval": [2, 3, 4, 5, 6],
    "deepcache.cache_branch_id": [0, 1, 2],
    "tome.ratio": [0.1, 0.3, 0.5, 0.7],
    "tgate.gate_step": [4, 8, 12, 16],
}
REBASELINE_EVERY = 40  # landscapes re-time the baseline now and then: CPU speed drifts
DATA = ROOT / "benchmarks" / "data"


def landscape_path(num_samples: int = 3, batch_size: int = 1, recording: int = 1, combo: str = ""):
    """Where a landscape of this size lives (the first one, 3x1, keeps its original name); a
    second, independent recording of the same grid (`recording` 2) ends in "-2"; the grid of a
    combo within it (`combo`, e.g. "deepcache+tome") is named after it."""
    again = ("" if recording == 1 else f"-{recording}")
    within = f"-{combo}" if combo and combo != "deepcache+tome+tgate" else ""
    if (num_samples, batch_size) == (3, 1):
        return DATA / f"landscape-cpu-bench-batches{within}{again}.json"
    return DATA / f"landscape-cpu-bench-batches-{num_samples}x{batch_size}{within}{again}.json"


def tell_point(study, trial, spec, point: dict) -> None:
    """Tell Optuna a recorded point as a trial of `spec` would be told: its speedup, with the
    spec's constraints on its figures."""
    from optsearch.optimize.objectives import constraints

    summary = {"speedup": point["speedup"], "psnr": {"mean": point["psnr"]}}
    for name, value in constraints(spec, summary).items():
        trial.set_constraint(name, value)
    study.tell(trial, point["speedup"])


@dataclass(frozen=True)
class Found:
    """A completed feasible trial: its speedup interval, batches and recorded baseline timing."""

    interval: SpeedupInterval
    batch_seconds: list[float]
    baseline: int


def key_of(params: dict) -> tuple:
    return tuple(sorted((k, round(v, 6)) for k, v in params.items()
                        if k.split(".")[1] in ("cache_interval", "cache_branch_id", "ratio", "gate_step")))


def limit_in_a_gap(psnrs: list[float]) -> float:
    """A PSNR limit off every point's edge: the middle of the widest gap between neighbouring
    figures in the landscape's middle half. (The median itself is a point's figure, so the answer
    sat on the limit by construction: 0.02 dB above it.)"""
    values = sorted(set(round(v, 6) for v in psnrs))
    low, high = np.percentile(values, [25, 75])
    middle = [v for v in values if low <= v <= high]
    gap, below = max((b - a, a) for a, b in zip(middle, middle[1:], strict=False))
    return below + gap / 2


class Landscape:
    """A recorded landscape, replayed. `answer`: another, independent recording of the same grid
    that defines what the search should find (each point's speedup, hence the best and the
    answers); None grades the search on the very recording it replays (leaky)."""

    def __init__(self, data: dict, limit: float | None, answer: dict | None = None):
        self.data = data
        self.points = {key_of(p["params"]): p for p in data["points"]}
        self.truth = {key_of(p["params"]): p for p in (answer or data)["points"]}
        self.batch_size = data["batch_size"]
        self.limit = limit if limit is not None else limit_in_a_gap(
            [p["psnr"] for p in (answer or data)["points"]])
        feasible = [p for p in self.truth.values() if p["psnr"] >= self.limit]
        self.best = max(p["speedup"] for p in feasible)
        self.grid_seconds = sum(self.cost(p, p["batch_seconds"], short=False) for p in data["points"])

    def true_speedup(self, point: dict) -> float:
        """The point's speedup on the answer's recording."""
        return self.truth[key_of(point["params"])]["speedup"]

    def feasible(self, point: dict) -> bool:
        return self.truth[key_of(point["params"])]["psnr"] >= self.limit

    def baseline(self, point: dict) -> list[float]:
        return self.data["baselines"][point["baseline"]]["batch_seconds"]

    def cost(self, point: dict, batches: list[float], short: bool, warm: bool = False) -> float:
        """Device seconds: the warm-up (none in a warm process, the recorded short one, or one full
        batch) plus the timed batches."""
        full = float(np.mean(point["batch_seconds"])) * self.batch_size
        warmup = 0.0 if warm else point["warmup_seconds"] if short else full
        return warmup + sum(batches) * self.batch_size


@dataclass
class IssueTimeQualityStop:
    """The early stop as it was when the issue was filed ("today"): quality only, a two-sided
    interval at 1 - alpha / n_batches, of the prompts' mean (no finite-population correction)."""

    limit: float
    min_batches: int = 2

    def __call__(self, partial) -> str | None:
        if partial.batches_evaluated < self.min_batches or partial.images_evaluated < 2:
            return None
        per_look = 1 - (1 - partial.confidence) / partial.n_batches
        return "quality" if Interval.of(partial.psnr, per_look).high < self.limit else None


def measure(land: Landscape, point: dict, rule, warmed_up: bool = True) -> tuple[list[float], str | None]:
    """Replay one trial batch by batch: the batches it ran and why it stopped (None: it finished)."""
    per_prompt = point["psnr_per_prompt"]
    n = len(point["batch_seconds"])
    partial = Comparison(setting={}, num_samples=len(per_prompt), batch_size=land.batch_size,
                         n_batches=n, confidence=0.95,
                         baseline_seconds_per_image=float(np.mean(land.baseline(point))),
                         baseline_batch_seconds=land.baseline(point),
                         warmup_seconds=point["warmup_seconds"] if warmed_up else 0.0)
    for index, seconds in enumerate(point["batch_seconds"]):
        partial.batch_seconds.append(seconds)
        partial.inference_seconds += seconds * land.batch_size
        span = per_prompt[index * land.batch_size:(index + 1) * land.batch_size]
        partial.psnr += span
        partial.clip_scores += [0.0] * len(span)
        partial.baseline_clip_scores += [0.0] * len(span)
        partial.batches_evaluated += 1
        if rule is not None and partial.batches_evaluated < n:
            reason = rule(partial)
            if reason:
                return partial.batch_seconds, reason
    return partial.batch_seconds, None
