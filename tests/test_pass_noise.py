"""The pass-level term of speedup intervals: estimated from the workers' baseline probes, it
makes an interval cover what a repeat in a fresh pass reads (issue 25, item 1)."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

import optsearch
from optsearch.measure.speedup import PassNoise, speedup_interval
from optsearch.optimize import study as studies
from optsearch.optimize.pass_noise import MIN_DF, assumed, estimate, probe_due

from .conftest import TINY_SPEC


def record(probes, batches=(1.0, 1.0), fingerprint="fp"):
    return {"fingerprint": fingerprint, "probes": [{"seconds_per_image": s} for s in probes],
            "timings": [{"batch_seconds": list(batches)}]}


def test_the_estimate_is_the_probes_spread_less_the_batch_noise_pooled_over_workers():
    first, second = [1.0, 1.2, 0.9], [2.0, 2.4]  # one slow worker: its own mean is taken out
    noise = estimate([record(first), record(second), record([5.0, 9.0], fingerprint="other")],
                     "fp", prior=0.05)
    logs = [np.log(first) - np.log(first).mean(), np.log(second) - np.log(second).mean()]
    spread = sum(float((d ** 2).sum()) for d in logs) / 3  # df: 2 + 1
    assert noise.df == 3 and noise.probes == 5 and noise.variance == pytest.approx(spread)
    noisy_batches = estimate([record(first, batches=(1.0, 1.1, 0.95))], "fp", 0.05)
    assert noisy_batches.variance < estimate([record(first)], "fp", 0.05).variance
    calm = estimate([record([1.0, 1.0, 1.0], batches=(1.0, 1.3))], "fp", 0.05)
    assert calm.variance == 0.0  # batch noise explains the probes: no pass effect


def test_the_prior_holds_until_the_probes_give_enough_degrees_of_freedom():
    few = estimate([record([1.0, 1.5]), record([1.0])], "fp", prior=0.10)
    assert few.df < MIN_DF or math.isinf(few.df)
    assert few == PassNoise(math.log1p(0.10) ** 2, math.inf, 3) and few.percent == pytest.approx(10.0)
    assert probe_due(few, 1, every=3) and not probe_due(few, 0, every=3)
    measured = estimate([record([1.0, 1.5, 1.2])], "fp", prior=0.10)
    assert not probe_due(measured, 2, every=3) and probe_due(measured, 3, every=3)
    assert not probe_due(few, 5, every=0)  # probes off: the prior stays


def test_the_pass_term_widens_every_interval_and_in_simulation_covers_the_truth():
    """Passes that differ by 8 % and batches by 2 %: the batch-only interval covers the true
    speedup far less often than 95 %; with the probes' estimate it covers it about as promised."""
    rng = np.random.default_rng(0)
    pass_sd, batch_sd, true_speedup, covered = 0.08, 0.02, 2.0, {"batches": 0, "passes": 0}
    runs = 400
    for _ in range(runs):
        def one_pass(seconds, batches=4):
            return list(seconds * np.exp(rng.normal(0, pass_sd) + rng.normal(0, batch_sd, batches)))
        base, fast = one_pass(1.0), one_pass(1.0 / true_speedup)
        probes = [one_pass(1.0, 1)[0] for _ in range(6)]
        noise = estimate([{"fingerprint": "fp", "probes": [{"seconds_per_image": s} for s in probes],
                           "timings": [{"batch_seconds": base}]}], "fp", prior=0.05)
        for key, term in (("batches", None), ("passes", noise)):
            interval = speedup_interval(base, fast, 0.95, pass_noise=term)
            covered[key] += interval.low <= true_speedup <= interval.high
    assert covered["batches"] / runs < 0.6
    assert covered["passes"] / runs >= 0.92, covered
    narrow = speedup_interval([1.0, 1.02, 0.99], [0.5, 0.51, 0.49], 0.95)
    wide = speedup_interval([1.0, 1.02, 0.99], [0.5, 0.51, 0.49], 0.95, pass_noise=assumed(0.05))
    assert wide.low < narrow.low and wide.high > narrow.high and wide.speedup == narrow.speedup


def test_a_worker_probes_between_trials_and_its_trials_carry_the_pass_term(tmp_path, tiny_pipe):
    """Probes after each trial until measured, recorded with the worker's timings; each trial
    says what pass noise its interval counts (the prior first, then the probes')."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = (TINY_SPEC.replace("n_trials = 4", "n_trials = 4\nwarm_start = []\nearly_stop = false")
            .replace("[search]", "[search]\npass_noise = 0.2"))
    (tmp_path / "tiny.toml").write_text(spec)
    optsearch.search(tiny_pipe, tmp_path / "tiny.toml", storage=url, progress=False)
    study = optuna.load_study(study_name="tiny", storage=url)
    [timing] = studies.timings(study)
    assert len(timing["probes"]) == 3  # after trials 1, 2, 3: 3 probes give df 2
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    first, last = trials[0].user_attrs, trials[-1].user_attrs
    assert first["pass_noise"] == pytest.approx(20.0) and first["pass_noise_df"] is None
    assert last["pass_noise_df"] == MIN_DF and last["pass_noise_probes"] == 3
    noise = estimate([timing], timing["fingerprint"], 0.2)
    assert last["pass_noise"] == pytest.approx(noise.percent)
    recomputed = speedup_interval(timing["timings"][0]["batch_seconds"], last["batch_seconds"],
                                  0.95, last["speedup"], pass_noise=noise)
    assert (last["speedup_low"], last["speedup_high"]) == pytest.approx((recomputed.low, recomputed.high))
