"""How much a whole pass's speed varies on a device: the pass-level term of every speedup interval.

A trial's speedup divides the baseline's seconds, timed once when the worker started, by the
trial's, timed minutes later. Whatever changed the device's speed in between (contention, clocks,
heat) is not batch-to-batch noise, and an interval built from batches alone covered a repeat 43 %
of the time here (benchmarks/RESULTS.md). So each worker times one batch of the plain pipeline
between trials (a probe: `search.probe_every`) and records it with its baseline timings. The
spread of a worker's probes, less the batch noise its baseline passes show, is the variance of
one pass (pooled over the workers of a fingerprint, with its degrees of freedom). Until the
fingerprint has `MIN_DF` of them, the spec's `search.pass_noise` is assumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from optsearch.measure.speedup import PassNoise

MIN_DF = 2  # probes' degrees of freedom before the measured spread replaces the spec's prior


def _squares(values: Iterable[float]) -> tuple[float, int]:
    """(sum of squared deviations of the logs from their mean, degrees of freedom)."""
    logs = np.log(np.asarray(list(values), dtype=np.float64))
    if len(logs) < 2:
        return 0.0, 0
    return float(((logs - logs.mean()) ** 2).sum()), len(logs) - 1


def assumed(prior: float) -> PassNoise:
    """The spec's prior alone: a share of speed (0.05 = 5 %) one pass may differ by."""
    return PassNoise(math.log1p(prior) ** 2, math.inf, 0)


def estimate(records: Iterable[dict], fingerprint: str, prior: float) -> PassNoise:
    """The pass noise of `fingerprint` from the workers' timing records (optimize/baseline.py):
    probes' pooled within-worker variance of log seconds, less the baseline passes' batch
    variance; `prior` (a share of speed, 0.05 = 5 %) while the probes give under MIN_DF."""
    squares = batch_squares = 0.0
    df = batch_df = probes = 0
    for record in records:
        if record.get("fingerprint") != fingerprint:
            continue
        seconds = [probe["seconds_per_image"] for probe in record.get("probes", ())]
        probes += len(seconds)
        ss, d = _squares(seconds)
        squares, df = squares + ss, df + d
        for timing in record.get("timings", ()):
            ss, d = _squares(timing.get("batch_seconds") or ())
            batch_squares, batch_df = batch_squares + ss, batch_df + d
    if df < MIN_DF:
        return PassNoise(assumed(prior).variance, math.inf, probes)
    batch_variance = batch_squares / batch_df if batch_df else 0.0
    return PassNoise(max(0.0, squares / df - batch_variance), df, probes)


def probe_due(noise: PassNoise, trials_since_probe: int, every: int) -> bool:
    """Probe after every trial until the spread is measured, then every `every` trials (0: never)."""
    if every <= 0 or trials_since_probe == 0:
        return False
    return math.isinf(noise.df) or trials_since_probe >= every
