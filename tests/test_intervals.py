"""The speedup interval and the feasibility rule: arithmetic, edge cases, coverage by simulation."""

from __future__ import annotations

import numpy as np
import pytest

from optsearch.measure.speedup import speedup_interval
from optsearch.optimize import objectives
from optsearch.study_spec import SpecError, spec_from_dict


def test_point_estimate_and_bounds_with_two_batches():
    interval = speedup_interval([1.0, 1.1], [0.5, 0.52])
    assert interval.speedup == pytest.approx(1.05 / 0.51)
    assert interval.low < interval.speedup < interval.high
    assert interval.high < 10 and interval.low > 0.1  # wide but finite with ~2 degrees of freedom


def test_one_batch_gives_no_interval_and_constant_timings_no_width():
    assert speedup_interval([1.0], [0.5, 0.5]).low is None
    assert speedup_interval([1.0, 1.0], [0.5]).high is None
    steady = speedup_interval([1.0, 1.0, 1.0], [0.25, 0.25])
    assert steady.low == steady.high == steady.speedup == 4.0


def test_given_point_estimate_is_the_centre_on_the_log_scale():
    interval = speedup_interval([1.0, 1.2, 0.9], [0.5, 0.55, 0.45], speedup=2.0)
    assert interval.speedup == 2.0
    assert np.log(interval.high / 2.0) == pytest.approx(np.log(2.0 / interval.low))


@pytest.mark.parametrize("batches", [2, 100])
def test_coverage_of_the_true_ratio_is_near_nominal(batches):
    """Log-normal batch noise (CV 10 %), true speedup 2: the 95 % interval should cover it ~95 %."""
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    draws = 2000
    for _ in range(draws):
        base = np.exp(rng.normal(0.0, 0.1, batches))
        fast = 0.5 * np.exp(rng.normal(0.0, 0.1, batches))
        interval = speedup_interval(base, fast)
        covered += interval.low <= 2.0 <= interval.high
        widths.append(interval.high / interval.low)
    assert 0.92 <= covered / draws <= 0.99
    if batches == 100:
        assert np.median(widths) < 1.1  # narrows as 1/sqrt(n)
    else:
        assert np.median(widths) > 1.3


def test_pooled_interval_decides_after_two_batches_where_welch_cannot():
    """Early stop's look: 8 baseline batches, 2 of the setting, 99.4 % per look (8 looks)."""
    base = [1.0, 1.03, 0.97, 1.01, 0.99, 1.02, 0.98, 1.0]
    fast = [0.5 * 1.03, 0.5 * 0.97]  # as scattered as the baseline (CV 3 %)
    welch = speedup_interval(base, fast, 1 - 0.05 / 8)
    pooled = speedup_interval(base, fast, 1 - 0.05 / 8, pooled=True)
    assert welch.high / welch.low > 2.0  # ~1 degree of freedom: decides nothing
    assert pooled.low < 2.0 < pooled.high and pooled.high / pooled.low < 1.35
    assert speedup_interval(base, fast[:1], pooled=True).high is not None  # the baseline's noise
    assert speedup_interval([1.0], [0.5], pooled=True).high is None  # no noise estimate at all


def test_pooled_interval_widens_when_the_settings_batches_scatter():
    base = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0]
    steady = speedup_interval(base, [0.5, 0.505], 0.99, pooled=True)
    scattered = speedup_interval(base, [0.5, 0.8], 0.99, pooled=True)
    assert scattered.high / scattered.low > 2 * steady.high / steady.low


def test_pooled_coverage_is_near_nominal_with_equal_noise():
    rng = np.random.default_rng(2)
    covered, draws = 0, 2000
    for _ in range(draws):
        base = np.exp(rng.normal(0.0, 0.1, 8))
        fast = 0.5 * np.exp(rng.normal(0.0, 0.1, 2))
        interval = speedup_interval(base, fast, pooled=True)
        covered += interval.low <= 2.0 <= interval.high
    assert 0.92 <= covered / draws <= 0.98


def spec(**quality) -> object:
    return spec_from_dict({"model": {"id": "builtin:tiny"}, "quality": {"metric": "psnr",
                                                                      "limit": 30.0, **quality}})


def summary(mean: float, low: float, high: float) -> dict:
    return {"speedup": 2.0, "speedup_low": 1.5, "psnr": {"mean": mean, "low": low, "high": high}}


def test_rule_mean_checks_the_mean_and_rule_bound_the_unsafe_bound():
    near = summary(31.0, 29.0, 33.0)  # the mean meets 30 dB, its lower bound does not
    assert objectives.constraints(spec(), near)["quality"] == pytest.approx(-1.0)
    assert objectives.constraints(spec(rule="bound"), near)["quality"] == pytest.approx(1.0)
    one_prompt = summary(31.0, float("-inf"), float("inf"))
    assert objectives.constraints(spec(rule="bound"), one_prompt)["quality"] > 0


def test_rule_bound_in_target_speedup_mode_uses_the_speedup_low_bound():
    target = spec_from_dict({"model": {"id": "builtin:tiny"}, "quality": {"rule": "bound"},
                             "objective": {"mode": "target-speedup", "target_speedup": 1.8}})
    assert objectives.constraints(target, summary(31, 30, 32))["speedup"] == pytest.approx(0.3)


def test_unknown_rule_and_bad_confirm_table_are_spec_errors():
    with pytest.raises(SpecError) as error:
        spec_from_dict({"quality": {"rule": "median"}, "confirm": {"num_samples": 0, "source": "x.doc"},
                        "search": {"retime_baseline_every": -1}})
    text = "\n".join(error.value.problems)
    assert "quality.rule: unknown rule 'median' (allowed: mean, bound)" in text
    assert "confirm.num_samples" in text and "confirm.source" in text
    assert "search.retime_baseline_every" in text


def test_a_pass_term_never_narrows_an_interval():
    """Two batches a side give t at about 2 df; a well-measured pass term raises the df, which
    alone would shrink t by more than the variance grows."""
    from optsearch.measure.speedup import PassNoise

    base, fast = [1.0, 1.3], [0.5, 0.62]
    alone = speedup_interval(base, fast, 0.95)
    with_passes = speedup_interval(base, fast, 0.95, pass_noise=PassNoise(1e-4, 200))
    assert with_passes.low <= alone.low and with_passes.high >= alone.high


def test_the_repeat_range_holds_a_fresh_measurement_where_the_interval_does_not():
    """Simulated passes with a pass effect per side: the interval (with the known pass term) covers
    the true speedup about 95 % of the time but a repeat's reading only about 83 %, since the
    repeat carries its own noise; the repeat range (sqrt(2) wider on the log scale) holds ~95 %."""
    from optsearch.measure.speedup import PassNoise, repeat_range

    rng = np.random.default_rng(5)
    batch_sd, pass_sd, true = 0.03, 0.08, 2.0
    known = PassNoise(pass_sd**2, float("inf"))

    def measure() -> tuple[np.ndarray, np.ndarray]:
        base = 1.0 * np.exp(rng.normal(0, pass_sd) + rng.normal(0, batch_sd, 8))
        fast = (1.0 / true) * np.exp(rng.normal(0, pass_sd) + rng.normal(0, batch_sd, 8))
        return base, fast

    truth = interval_holds = range_holds = 0
    runs = 2000
    for _ in range(runs):
        first = speedup_interval(*measure(), 0.95, pass_noise=known)
        base, fast = measure()
        again = base.mean() / fast.mean()
        wide = repeat_range(first)
        truth += first.low <= true <= first.high
        interval_holds += first.low <= again <= first.high
        range_holds += wide.low <= again <= wide.high
        assert wide.low < first.low and wide.high > first.high and wide.speedup == first.speedup
    assert truth / runs > 0.92
    assert 0.75 < interval_holds / runs < 0.88
    assert range_holds / runs > 0.92
    assert repeat_range(speedup_interval([1.0], [0.5])) is None  # no interval, no range
