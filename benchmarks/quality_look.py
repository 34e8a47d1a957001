"""The early-stop quality look: plain and with the prompts' own effects, at
Bonferroni's and at the sequential (Pocock) per-look alpha.

On the recorded landscapes (3 and 8 prompts in batches of 1, 16 in batches of 2), for every grid
point as the trial and K other points as the study's earlier trials (random draws), at every look
before the last (from the first batch, as a study's looks): how often some look's one-sided bound
misses the trial's final mean (per trial: the family-wise figure, which must stay under the
study's 0.05; and per look), how often a look stops the trial (the PSNR limit is the grid's
median), and how often it stops a trial whose final mean is feasible (a wrong stop). K = 3 and 4
are below the study's `PromptEffects.MIN_TRIALS` (5): they show how close fewer earlier trials
come. The narrowed plain look of section 10c is gone from the product; RESULTS 10e has its misses.

    python -m benchmarks quality-look --draws 3
"""

from __future__ import annotations

import json

import numpy as np

from benchmarks.common import table
from benchmarks.replay import landscape_path
from optsearch.measure.metrics import Interval
from optsearch.optimize.evidence import PromptEffects
from optsearch.optimize.sequential import per_look_alpha

OTHERS = (3, 4, 5, 10, 20)  # earlier trials; the study waits for PromptEffects.MIN_TRIALS


class AnyCount(PromptEffects):
    """PromptEffects from any number of earlier trials: to see why the study waits for 5."""

    MIN_TRIALS = 2


def looks_of(total: int, batch: int) -> list[int]:
    """The prompts measured at each look: after every batch but the last."""
    return list(range(batch, total, batch))


def alphas(total: int, batch: int) -> dict[str, float]:
    """The per-look alpha of a 95 % study: Bonferroni, sequential for the plain look (an unending
    stream of prompts) and for the prompt-effect look (the study's fixed prompts)."""
    looks = looks_of(total, batch)
    return {"bonferroni": 0.05 / len(looks), "plain": per_look_alpha(0.05, looks),
            "effects": per_look_alpha(0.05, looks, total)}


def check(values: np.ndarray, batch: int, others: int | None, alpha: float, draws: int,
          rng) -> list[float]:
    """[trials with a miss, looks with a miss, stops, wrong stops] (fractions): the plain look
    when `others` is None, else the prompt-effect look from `others` random earlier trials."""
    total = values.shape[1]
    limit = float(np.median(values.mean(axis=1)))
    counts, looks, trials = np.zeros(4), 0, 0
    for trial, row in enumerate(values):
        final = row.mean()
        candidates = [i for i in range(len(values)) if i != trial]
        for _ in range(draws if others else 1):
            effects = AnyCount.of(values[rng.choice(candidates, others, replace=False)]) if others else None
            missed = False
            for seen in looks_of(total, batch):
                interval = (effects.interval(row[:seen], 1 - 2 * alpha) if effects
                            else Interval.of(row[:seen], 1 - 2 * alpha))
                stop = interval.high < limit
                missed |= final > interval.high
                looks += 1
                counts[1:] += (final > interval.high, stop, stop and final >= limit)
            trials += 1
            counts[0] += missed
    counts[0] /= trials
    counts[1:] /= looks
    return list(counts)


def main(draws: int = 3) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for size in ((3, 1), (8, 1), (16, 2)):
        points = json.loads(landscape_path(*size).read_text())["points"]
        values = np.array([point["psnr_per_prompt"] for point in points])
        per_look = alphas(size[0], size[1])
        name = f"{size[0]} in batches of {size[1]}"
        for boundary in ("bonferroni", "sequential"):
            alpha = per_look["bonferroni" if boundary == "bonferroni" else "plain"]
            rows.append([name, "plain", "-", boundary, f"{alpha:.4f}",
                         *(f"{x:.4f}" for x in check(values, size[1], None, alpha, draws, rng))])
        for others in OTHERS:
            for boundary in ("bonferroni", "sequential"):
                alpha = per_look["bonferroni" if boundary == "bonferroni" else "effects"]
                rows.append([name, "prompt effects", others, boundary, f"{alpha:.4f}",
                             *(f"{x:.4f}" for x in check(values, size[1], others, alpha, draws, rng))])
    print("# quality look: misses of the final mean (one-sided), stops, wrong stops")
    print(table(["prompts", "look", "earlier trials", "boundary", "alpha per look",
                 "trials with a miss (<= 0.05)", "looks with a miss", "stops per look",
                 "wrong stops per look"], rows))

