"""The speedup look after a trial's first batch, from the device's first-batch record.

On the recorded landscapes (3 and 8 prompts in batches of 1, 16 in batches of 2), each grid point
is the trial, other points are the study's earlier trials, and the question is the one the
dominated look asks: is the trial slower than the best? For every ordered pair of points whose
final speedups are at par (the trial 0-3 % faster than the best: it could be the answer) or near
it (0-10 %), how often some look of `EarlyStop` stops the trial as "dominated", with the speedup
looks from the 2nd batch (no record) and from the 1st (a record of RECORD earlier trials, each cut
at a random batch >= 2, as trials stopped early leave them). Both through the speedups (the best
timed on another baseline) and by the best's own seconds (the same baseline timing). A rule at
alpha 0.05 should stop a trial at par at most about 5 % of the time; the final figures are noisy
too, so this is a check, not an exact level. Then the same with the guards as shipped (looks
from the 1st batch): a 5 % margin alone, and with the best lowered as the largest of
SELECTED_FROM feasible trials; here the best is not a selected maximum, so the margin-only column
is the upper estimate. Also: how far first batches read from the rest of their trial (log
seconds), the record's raw material; and how often the trial's own pooled interval (as the look
computes it from the 2nd batch) has its one-sided bound under the trial's final figure, per look,
against the look's alpha.

    python -m benchmarks speedup-look --count 1500
"""

from __future__ import annotations

import json

import numpy as np

from benchmarks.common import table
from benchmarks.replay import Landscape, landscape_path, measure
from optsearch.measure.speedup import speedup_interval
from optsearch.optimize.early_stop import EarlyStop
from optsearch.optimize.evidence import FirstBatches
from optsearch.optimize.sequential import per_look_alpha

RECORD = 20  # earlier trials in the first-batch record (a study a third of the way to the answer)
SELECTED_FROM = 10  # feasible trials a study's best is the largest of, a third of the way there
# the guards as shipped (search.stop_margin's default; the best lowered for being a maximum):
# margin only, then margin and the selected-maximum correction
GUARDS = ((0.05, 1), (0.05, SELECTED_FROM))
LANDSCAPES = ((3, 1), (8, 1), (16, 2))


class Pairs:
    """The trial/best pairs of one landscape and the looks of EarlyStop on them."""

    def __init__(self, data: dict, rng: np.random.Generator):
        self.land, self.points, self.rng = Landscape(data, None), data["points"], rng

    def record(self, exclude: set[int]) -> FirstBatches:
        others = [j for j in range(len(self.points)) if j not in exclude]
        chosen = self.rng.choice(others, RECORD, replace=False)
        cut = [self.points[j]["batch_seconds"] for j in chosen]
        return FirstBatches.of((s[:self.rng.integers(2, len(s) + 1)], False) for s in cut)

    def stopped_at(self, trial: dict, best: dict, first_look: int, same_baseline: bool,
                   record: FirstBatches, margin: float = 0.0, selected_from: int = 1) -> int:
        """The batch after which the rule stops the trial as dominated; 0 if it never does."""
        interval = speedup_interval(self.land.baseline(best), best["batch_seconds"], 0.95,
                                    best["speedup"])
        rule = EarlyStop("psnr", speedup_after=first_look, speedup_to_beat=interval,
                         first_batches=record,
                         best_batch_seconds=best["batch_seconds"] if same_baseline else None,
                         stop_margin=margin, best_selected_from=selected_from)
        batches, reason = measure(self.land, trial, rule, warmed_up=False)  # as the record's trials
        return len(batches) if reason else 0

    def at_par(self, low: float, high: float, same_baseline: bool, count: int) -> list[tuple]:
        pairs = [(i, j) for i, a in enumerate(self.points) for j, b in enumerate(self.points)
                 if i != j and low <= a["speedup"] / b["speedup"] <= high
                 and (not same_baseline or a["baseline"] == b["baseline"])]
        return [pairs[k] for k in self.rng.choice(len(pairs), min(count, len(pairs)), replace=False)]


def first_batch_excess(data: dict) -> list:
    excess = np.array(FirstBatches.of((p["batch_seconds"], True) for p in data["points"]).after_warmup)
    return [f"{np.mean(excess):+.3f}", f"{np.std(excess, ddof=1):.3f}",
            *(f"{v:+.3f}" for v in np.percentile(excess, [90, 98])), f"{excess.max():+.3f}"]


def pooled_misses(data: dict) -> list:
    """Per look from the 2nd batch: the share of points whose pooled upper bound lies under their
    final speedup (same baseline: its noise is common to both), and the look's alpha."""
    points = data["points"]
    batches = len(points[0]["batch_seconds"])
    alpha = per_look_alpha(0.05, list(range(2, batches)))
    misses = []
    for look in range(2, batches):
        count = 0
        for point in points:
            baseline = data["baselines"][point["baseline"]]["batch_seconds"]
            first = point["batch_seconds"][:look]
            high = speedup_interval(baseline, first, 1 - 2 * alpha, float(np.mean(baseline) / np.mean(first)),
                                    pooled=True).high
            count += high < point["speedup"]  # the recorded figure: mean(baseline) / mean(batches)
        misses.append(f"{count / len(points):.3f}")
    return [f"{alpha:.4f}", " ".join(misses)]


def main(count: int = 1500) -> None:
    rng = np.random.default_rng(0)
    excess_rows, miss_rows, rows = [], [], []
    for prompts, size in LANDSCAPES:
        data = json.loads(landscape_path(prompts, size).read_text())
        name = f"{prompts} prompts x {size}"
        excess_rows.append([name, len(data["points"]), *first_batch_excess(data)])
        miss_rows.append([name, *pooled_misses(data)])
        pairs = Pairs(data, rng)
        for low, high in ((1.0, 1.03), (1.0, 1.1)):
            for same in (False, True):
                chosen = pairs.at_par(low, high, same, count)
                row = [name, f"{low:.2f}-{high:.2f}", "same baseline" if same else "speedups",
                       len(chosen)]
                records = [pairs.record({i, j}) for i, j in chosen]
                for first_look in (2, 1):
                    stops = [pairs.stopped_at(pairs.points[i], pairs.points[j], first_look, same,
                                              record) for (i, j), record in zip(chosen, records, strict=True)]
                    row.append(f"{np.mean([s > 0 for s in stops]):.3f}")
                row.append(f"{np.mean([s == 1 for s in stops]):.3f}")
                for margin, selected_from in GUARDS:
                    stops = [pairs.stopped_at(pairs.points[i], pairs.points[j], 1, same, record,
                                              margin, selected_from)
                             for (i, j), record in zip(chosen, records, strict=True)]
                    row.append(f"{np.mean([s > 0 for s in stops]):.3f}")
                rows.append(row)
                print(" | ".join(str(v) for v in row), flush=True)
    print("\n# how far a first batch reads from the mean of its trial's later ones (log seconds)")
    print(table(["landscape", "points", "mean", "sd", "p90", "p98", "max"], excess_rows))
    print("\n# the pooled look's upper bound under the trial's final speedup, per look from batch 2")
    print(table(["landscape", "alpha per look", "share of points, look 2, 3, ..."], miss_rows))
    print(f"\n# trials at par with the best stopped as dominated (record of {RECORD} trials)")
    print(table(["landscape", "trial / best (final)", "compared by", "pairs",
                 "stopped, looks from batch 2", "stopped, looks from batch 1",
                 "of them after batch 1", "shipped: margin 5 %",
                 f"shipped: margin 5 %, best of {SELECTED_FROM}"], rows))

