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
from optsearch.optimize.pass_noise import PRIOR_DF, assumed, estimate, probe_due

from .conftest import TINY_SPEC


def record(probes, batches=(1.0, 1.0), fingerprint="fp", baseline=1.0):
    return {"fingerprint": fingerprint, "probes": [{"seconds_per_image": s} for s in probes],
            "timings": [{"batch_seconds": list(batches), "seconds_per_image": baseline}]}


def squares(values):
    logs = np.log(values)
    return float(((logs - logs.mean()) ** 2).sum())


def test_the_estimate_pools_probes_and_baseline_passes_less_batch_noise_with_the_prior():
    """Over the study's life, not within each worker: a worker that ran slower is drift a trial
    hours after its baseline, or a repeat elsewhere, meets too."""
    first, second = [1.0, 1.2, 0.9], [2.0, 2.4]
    records = [record(first, baseline=1.0), record(second, baseline=1.1),
               record([5.0, 9.0], fingerprint="other")]
    noise = estimate(records, "fp", prior=0.05)
    # probes: df 4 about their common mean; baseline passes: df 1; batch noise 0 here
    measured = (squares(first + second) + squares([1.0, 1.1])) / 5
    assert noise.df == PRIOR_DF + 5 and noise.probes == 5
    assert noise.variance == pytest.approx((PRIOR_DF * math.log1p(0.05) ** 2 + 5 * measured) / 9)
    noisy_batches = estimate([record(first, batches=(1.0, 1.1, 0.95))], "fp", 0.05)
    assert noisy_batches.variance < estimate([record(first)], "fp", 0.05).variance
    calm = estimate([record([1.0, 1.0, 1.0], batches=(1.0, 1.3))], "fp", 0.05)
    assert calm.variance == pytest.approx(PRIOR_DF * math.log1p(0.05) ** 2 / (PRIOR_DF + 2))


def test_the_prior_alone_until_something_is_measured_and_probes_on_their_schedule():
    nothing = estimate([record([1.0])], "fp", prior=0.10)
    assert nothing == PassNoise(math.log1p(0.10) ** 2, PRIOR_DF, 1)  # one probe, one pass: no spread
    assert nothing.percent == pytest.approx(10.0) and assumed(0.10).df == math.inf
    assert not probe_due(0, every=3) and not probe_due(2, every=3) and probe_due(3, every=3)
    assert not probe_due(5, every=0)  # probes off: the prior and the baseline passes stay


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
        probes = [one_pass(1.0, 1)[0] for _ in range(10)]
        noise = estimate([{"fingerprint": "fp", "probes": [{"seconds_per_image": s} for s in probes],
                           "timings": [{"batch_seconds": base, "seconds_per_image": np.mean(base)}]}],
                         "fp", prior=0.05)
        for key, term in (("batches", None), ("passes", noise)):
            interval = speedup_interval(base, fast, 0.95, pass_noise=term)
            covered[key] += interval.low <= true_speedup <= interval.high
    assert covered["batches"] / runs < 0.6
    assert covered["passes"] / runs >= 0.90, covered  # a 5 % prior below the true 8 % pulls down
    narrow = speedup_interval([1.0, 1.02, 0.99], [0.5, 0.51, 0.49], 0.95)
    wide = speedup_interval([1.0, 1.02, 0.99], [0.5, 0.51, 0.49], 0.95, pass_noise=assumed(0.05))
    assert wide.low < narrow.low and wide.high > narrow.high and wide.speedup == narrow.speedup


def test_a_worker_probes_between_trials_and_its_trials_carry_the_pass_term(tmp_path, tiny_pipe):
    """A probe every 2nd trial, recorded with the worker's timings; each trial says what pass
    noise its interval counts (the prior alone first, then with the probes)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = (TINY_SPEC.replace("n_trials = 4", "n_trials = 5\nwarm_start = []\nearly_stop = false")
            .replace("[search]", "[search]\npass_noise = 0.2\nprobe_every = 2"))
    (tmp_path / "tiny.toml").write_text(spec)
    optsearch.search(tiny_pipe, tmp_path / "tiny.toml", storage=url, progress=False)
    study = optuna.load_study(study_name="tiny", storage=url)
    [timing] = studies.timings(study)
    assert [p["after_trials"] for p in timing["probes"]] == [2, 4]
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    first, last = trials[0].user_attrs, trials[-1].user_attrs
    assert first["pass_noise"] == pytest.approx(20.0) and first["pass_noise_probes"] == 0
    assert last["pass_noise_probes"] == 2 and last["pass_noise_df"] == PRIOR_DF + 1
    noise = estimate([timing], timing["fingerprint"], 0.2)
    assert last["pass_noise"] == pytest.approx(noise.percent)
    recomputed = speedup_interval(timing["timings"][0]["batch_seconds"], last["batch_seconds"],
                                  0.95, last["speedup"], pass_noise=noise)
    assert (last["speedup_low"], last["speedup_high"]) == pytest.approx((recomputed.low, recomputed.high))
    batch_only = speedup_interval(timing["timings"][0]["batch_seconds"], last["batch_seconds"],
                                  0.95, last["speedup"])
    assert last["speedup_low"] <= batch_only.low and last["speedup_high"] >= batch_only.high
