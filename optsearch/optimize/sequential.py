"""The per-look alpha of a rule that looks after every batch: a group-sequential boundary.

A trial is looked at after each batch; a rule that stops it when a one-sided bound crosses a line
must keep the chance that *any* look crosses wrongly at `alpha`. Bonferroni (alpha / looks per
look) ignores that the looks are of one growing sample: the estimate after 6 batches is mostly the
one after 5, so the looks' errors are strongly correlated and far fewer independent chances to
cross exist than looks. The Pocock boundary (the same nominal level at every look) spends exactly
`alpha` on the looks' real correlation: with 7 looks one-sided at alpha 0.05 each look gets 0.0137
instead of Bonferroni's 0.0071, and with 99 looks 0.0046 instead of 0.0005.

The looks' errors, measured on n_1 < n_2 < ... items, are those of means of the same draws: the
error of look k has variance proportional to v_k = 1/n_k (a mean of an unending stream: timing
batches, prompts in the plain look) or v_k = 1/n_k - 1/N (the mean of a fixed set of N prompts,
which the last look knows exactly: the prompt-effect look), and Cov(e_j, e_k) = v_k for j < k.
The boundary is found by simulating those errors (a fixed seed: every worker gets the same
figure), then the looks use t quantiles at that nominal level as they did at Bonferroni's (the
usual approximation for estimated variances; benchmarks/quality_look.py checks the misses).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from statistics import NormalDist

import numpy as np

DRAWS = 200_000  # the simulated family-wise alpha is off by <= 2 % of alpha (binomial error)


def per_look_alpha(alpha: float, looks: Sequence[int], total: int | None = None) -> float:
    """The one-sided level of each look so that any of `looks` (the items measured at each look,
    increasing) crosses with chance `alpha`; `total` is the fixed set's size (None: unending)."""
    looks = tuple(int(n) for n in looks if total is None or n < total)
    if not looks:
        return alpha
    return _pocock(round(alpha, 12), looks, total)


@lru_cache(maxsize=256)
def _pocock(alpha: float, looks: tuple[int, ...], total: int | None) -> float:
    if len(looks) == 1:
        return alpha
    rng = np.random.default_rng(0)
    largest = np.full(DRAWS, -np.inf)
    if total is None:  # the sum of the draws, a Brownian motion in items, forward
        walk, done = np.zeros(DRAWS), 0
        for n in looks:
            walk += rng.standard_normal(DRAWS) * np.sqrt(n - done)
            done = n
            np.maximum(largest, walk / np.sqrt(n), out=largest)
    else:  # backward from the sum of all `total` items: each earlier sum given the later one
        later, at = rng.standard_normal(DRAWS) * np.sqrt(total), total
        grand_mean = later / total
        for n in reversed(looks):
            later = later * n / at + rng.standard_normal(DRAWS) * np.sqrt(n * (at - n) / at)
            at = n
            error = later / n - grand_mean
            np.maximum(largest, error / np.sqrt(1 / n - 1 / total), out=largest)
    boundary = float(np.quantile(largest, 1 - alpha))
    nominal = 1 - NormalDist().cdf(boundary)
    return min(alpha, max(alpha / len(looks), nominal))
