"""How much a whole pass's speed varies on a device: the pass-level term of every speedup interval.

A trial's speedup divides the baseline's seconds, timed once when the worker started, by the
trial's, timed minutes later. Whatever changed the device's speed in between (contention, clocks,
heat) is not batch-to-batch noise, and an interval built from batches alone covered a repeat 43 %
of the time here (benchmarks/RESULTS.md). So each worker times one batch of the plain pipeline
between trials (a probe: `search.probe_every`) and records it with its baseline timings. The
spread of the probes and of the baseline passes, less the batch noise they carry, is the variance
of one pass, pooled over the workers of a fingerprint with the spec's `search.pass_noise` as a
prior worth PRIOR_DF degrees of freedom.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from optsearch.measure.speedup import PassNoise

PRIOR_DF = 4  # the spec's search.pass_noise counts as this many degrees of freedom


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
    """The pass noise of `fingerprint` from the workers' timing records (optimize/baseline.py).

    Two kinds of pass are on record: probes (one batch each) and baseline timings (whole passes),
    from every worker of the fingerprint over the study's life. Each kind's spread about its own
    mean, less what batch noise alone gives it (the baseline passes' within-pass variance: whole
    for a one-batch probe, / batches for a whole pass), is the pass variance. Not about each
    worker's own mean: a trial hours after its baseline, or a repeat on another worker, meets the
    drift of the whole study (measured: about twice the spread within one worker's minutes). The
    spec's `prior` (a share of speed, 0.05 = 5 %) joins as PRIOR_DF degrees of freedom, so a few
    passes that happen to agree do not make the term vanish."""
    records = [r for r in records if r.get("fingerprint") == fingerprint]
    timings = [t for r in records for t in r.get("timings", ())]
    batch_squares = batch_df = 0.0
    for timing in timings:
        ss, d = _squares(timing.get("batch_seconds") or ())
        batch_squares, batch_df = batch_squares + ss, batch_df + d
    batch_variance = batch_squares / batch_df if batch_df else 0.0
    batches = float(np.mean([len(t.get("batch_seconds") or ()) for t in timings])) if timings else 1.0
    probes = [p["seconds_per_image"] for r in records for p in r.get("probes", ())]
    squares = df = excess_noise = 0.0
    for seconds, noise in ((probes, batch_variance),
                           ([t["seconds_per_image"] for t in timings], batch_variance / max(1.0, batches))):
        ss, d = _squares(seconds)
        squares, df, excess_noise = squares + ss, df + d, excess_noise + d * noise
    measured = max(0.0, (squares - excess_noise) / df) if df else 0.0
    variance = (PRIOR_DF * assumed(prior).variance + df * measured) / (PRIOR_DF + df)
    return PassNoise(variance, PRIOR_DF + df, len(probes))


def probe_due(trials_since_probe: int, every: int) -> bool:
    """Probe every `every` trials (0: never)."""
    return every > 0 and trials_since_probe >= every
