"""Benchmark 9d: the early-stop quality look with and without the prompts' own effects.

On the recorded landscapes (3 and 8 prompts in batches of 1, 16 in batches of 2), for every grid
point as the trial and K other points as the study's earlier trials (random draws), at every look
before the last: how often the look's one-sided bound misses the trial's final mean (it must not
exceed the look's alpha), how often the look stops the trial (the PSNR limit is the grid's median),
and how often it stops a trial whose final mean is feasible (a wrong stop). The looks start at the
first batch, as a study's do (`min_batches` 1). K = 3 and 4 are below the study's
`PromptEffects.MIN_TRIALS` (5): they show how close to alpha fewer earlier trials come.

    python benchmarks/quality_look.py [draws per point]
"""

from __future__ import annotations

import json
import sys

import numpy as np
from _common import table
from landscape_batches import landscape_path

from optsearch.early_stop import PromptEffects
from optsearch.quality import Interval

OTHERS = (3, 4, 5, 10, 20)  # earlier trials; the study waits for PromptEffects.MIN_TRIALS


class AnyCount(PromptEffects):
    """PromptEffects from any number of earlier trials: to see why the study waits for 5."""

    MIN_TRIALS = 2


def check(values: np.ndarray, batch: int, others: int, draws: int, rng) -> list:
    """[misses, stops, wrong stops] as fractions of looks: the plain look narrowed by the share of
    prompts known (as it was), the plain look (now), the prompt-effect look."""
    total = values.shape[1]
    alpha = 0.05 / (total // batch)  # the per-look alpha of a 95 % study
    limit = float(np.median(values.mean(axis=1)))
    counts, looks = np.zeros((3, 3)), 0
    for trial, row in enumerate(values):
        final = row.mean()
        candidates = [i for i in range(len(values)) if i != trial]
        for _ in range(draws):
            effects = AnyCount.of(values[rng.choice(candidates, others, replace=False)])
            for seen in range(batch, total, batch):  # a look may decide from the first batch
                looks += 1
                for index, interval in enumerate((Interval.of(row[:seen], 1 - 2 * alpha, total),
                                                  Interval.of(row[:seen], 1 - 2 * alpha),
                                                  effects.interval(row[:seen], 1 - 2 * alpha))):
                    stop = interval.high < limit
                    counts[index] += (final > interval.high, stop, stop and final >= limit)
    return [alpha, *(counts / looks).ravel()]


def main(draws: int = 3) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for size in ((3, 1), (8, 1), (16, 2)):
        points = json.loads(landscape_path(*size).read_text())["points"]
        values = np.array([point["psnr_per_prompt"] for point in points])
        for others in OTHERS:
            rows.append([f"{size[0]} in batches of {size[1]}", others,
                         *(f"{x:.4f}" for x in check(values, size[1], others, draws, rng))])
    print("# quality look: one-sided misses of the final mean, stops, wrong stops (per look)")
    print(table(["prompts", "earlier trials", "alpha", "plain, narrowed: misses", "stops", "wrong",
                 "plain (now): misses", "stops", "wrong", "prompt effects: misses", "stops",
                 "wrong"], rows))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
