"""MagCache's "auto" threshold range: which steps MagCache skips follows from the model's
magnitude ratios alone, so each trial's range is computed, not measured: from the threshold that
skips its first step to the one past which its max_skip_steps, retention_ratio and step count
allow no more skips. The default range [0.02, 0.5] mostly lay past that point on tiny FLUX: its
trials all ran the same saturated computation."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import optuna
import pytest

from optsearch.accelerators import AppliedSetting, calibrated_range, magcache
from optsearch.measure.generation import GenerationConfig, generate
from optsearch.measure.models import load_pipeline
from optsearch.study_spec import SpecError, spec_from_dict

from .conftest import generate_images, optsearch_cmd, study_after_one_trial, write_spec
from .test_families import DBCACHE_SPEC, FLUX_SPEC

STEPS = 12


@pytest.fixture(scope="module")
def flux_pipe():
    return load_pipeline("builtin:tiny-flux", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def ratios(flux_pipe):
    return magcache.measure(flux_pipe, STEPS, lambda: generate_images(
        flux_pipe, ["a red bus in the rain", "a small cat on a sofa"], steps=STEPS))["mag_ratios"]


def _run(pipe, ratios, steps: int, **params) -> tuple[float, np.ndarray]:
    """(the share of steps a real call of tiny FLUX computed with MagCache at `params`, its
    images)."""
    with AppliedSetting(pipe, {"magcache": params}, {"magcache": {"mag_ratios": ratios}}) as applied:
        images = generate_images(applied, ["a lighthouse at dusk"], steps=steps)
        return applied.computed_fraction(), images


def _computed(pipe, ratios, steps: int, **params) -> float:
    return _run(pipe, ratios, steps, **params)[0]


def test_the_bounds_of_a_hand_made_ratio_list():
    """Own errors |1 - r| past step 0: 0.1, 0.05, 0.02, 0.01, 0.1, so 0.01 skips step 4 first.
    Saturated at two skips in a row: steps 1 and 2 skip (errors 0.1, then 0.1 + |1 - 0.9 x
    0.95| = 0.245), step 3 computes, 4 and 5 skip (0.01, 0.01 + 0.089)."""
    ratios = [1.0, 0.9, 0.95, 1.02, 0.99, 1.1]
    assert magcache.threshold_bounds(ratios, 6, 2, 0.0) == pytest.approx([0.01, 0.245], abs=1e-4)
    skipped, errors = magcache.skipped_steps(ratios, 6, 1.0, 2, 0.0)
    assert skipped == [1, 2, 4, 5] and errors == pytest.approx([0.1, 0.245, 0.01, 0.099], abs=1e-6)
    assert magcache.skipped_steps(ratios, 6, 0.0099, 2, 0.0)[0] == []
    assert magcache.skipped_steps(ratios, 6, 0.0101, 2, 0.0)[0] == [4]
    # a retention of half the steps leaves steps 3-5 (0.02 first); one that keeps all, nothing
    assert magcache.threshold_bounds(ratios, 6, 2, 0.5)[0] == pytest.approx(0.01, abs=1e-4)
    assert magcache.threshold_bounds(ratios, 6, 2, 0.95) is None
    # a model whose norms overflowed (a NaN ratio) never skips that step: the others bound it
    assert magcache.threshold_bounds([1.0, float("nan"), 0.95, 1.02], 4, 2, 0.0) == \
        pytest.approx([0.02, 0.081], abs=1e-4)


def test_settings_that_skip_the_same_steps_are_one_computation():
    """`canonical_setting`: MagCache's parameters give way to the steps they skip (at the
    setting's own step count); other families, and records another version wrote, as given."""
    from optsearch.accelerators import canonical_setting

    calibration = {"magcache": {"mag_ratios": [1.0, 0.9, 0.95, 1.02, 0.99, 1.1]}}

    def canonical(threshold: float, **more) -> dict:
        return canonical_setting({"magcache": {"threshold": threshold, "max_skip_steps": 2,
                                               "retention_ratio": 0.0}, **more}, 6, calibration)

    assert canonical(0.011) == canonical(0.019) == {"magcache": {"skipped_steps": [4]}}
    assert canonical(0.021) != canonical(0.019)  # 0.02 is step 3's own error: it skips too
    assert canonical(0.011, steps={"num_inference_steps": 4}) == \
        {"steps": {"num_inference_steps": 4}, "magcache": {"skipped_steps": []}}
    assert canonical_setting({"magcache": {"threshold": 0.1}}, 6, {}) == {"magcache": {"threshold": 0.1}}
    older = {"magcache": {"threshold": 0.1, "retired": 1}}
    assert canonical_setting(older, 6, calibration) == older


@pytest.mark.parametrize("steps", [STEPS, 7])
def test_the_replayed_decision_skips_the_steps_a_real_call_skips(flux_pipe, ratios, steps):
    """The simulation is diffusers' own decision: over thresholds across the whole default range,
    several run lengths and retentions, at the model's steps and fewer (ratios interpolated),
    the share of steps it computes is what the real call computed."""
    for threshold in (0.001, 0.02, 0.05, 0.12, 0.3, 0.5):
        for max_skip_steps, retention_ratio in ((1, 0.1), (3, 0.2), (6, 0.4)):
            skipped, _ = magcache.skipped_steps(ratios, steps, threshold, max_skip_steps,
                                                retention_ratio)
            real = _computed(flux_pipe, ratios, steps, threshold=threshold,
                             max_skip_steps=max_skip_steps, retention_ratio=retention_ratio)
            assert real == pytest.approx(1 - len(skipped) / steps), (threshold, max_skip_steps,
                                                                     retention_ratio)


def test_every_threshold_in_a_trials_range_skips_and_none_is_the_saturated_run(flux_pipe):
    """Through the worker's evaluator (the calibration it stores): for each drawn max_skip_steps,
    retention_ratio and step count, the range's low end skips a step of a real call and just
    under its high end the call makes other images than the saturated run (a threshold of 10:
    as many skips as max_skip_steps allows). The problem it mends: the middle of the default
    range, 0.26, ran the saturated computation at 17 of these 18 draws (all but 6 steps, 6 in a
    row, retention 0.1, whose top is 0.31)."""
    from optsearch.measure.evaluate import evaluator_from_spec

    data = tomllib.loads(FLUX_SPEC)
    spec = spec_from_dict({**data, "search": {"accelerators": [["steps", "magcache"]]},
                           "space": {"magcache": {"threshold": "auto"},
                                     "steps": {"num_inference_steps": [6, STEPS]}}})
    assert [condition.step_counts for condition in spec.calibration_conditions("magcache")] \
        == [[STEPS]]  # fewer steps follow from the ratios
    evaluator = evaluator_from_spec(spec, pipe=flux_pipe)
    assert evaluator.calibration_images(spec) == 2  # one plain call of the first batch
    calibrated = evaluator.auto_ranges(spec)["magcache.threshold"]
    assert evaluator.calibration_images(spec) == 0
    stored = evaluator.calibration["magcache"]
    assert len(stored["mag_ratios"]) == STEPS and stored["by"]["threshold"][0] == "max_skip_steps"
    ratios, past_top = stored["mag_ratios"], 0
    for steps in (6, 9, STEPS):
        for skips in (1, 3, 6):
            for retention in (0.1, 0.5):
                values = {"max_skip_steps": skips, "retention_ratio": retention}
                low, high = calibrated.for_setting(values, steps)
                if steps == STEPS:  # the stored union holds every draw at the model's steps
                    union = stored["auto"]["threshold"]
                    assert union[0] <= low <= high <= union[1]
                draw = dict(values, threshold=low)
                assert _computed(flux_pipe, ratios, steps, **draw) < 1.0, (steps, values, low)
                _, saturated = _run(flux_pipe, ratios, steps, **values, threshold=10.0)
                _, below_top = _run(flux_pipe, ratios, steps, **values, threshold=high - 1e-4)
                assert not np.array_equal(below_top, saturated), (steps, values, high)
                _, middle = _run(flux_pipe, ratios, steps, **values, threshold=0.26)
                assert np.array_equal(middle, saturated) == (0.26 >= high), (steps, values, high)
                past_top += 0.26 >= high
    assert past_top >= 15  # of 18: the default range's upper half repeated one computation


def test_a_magcache_study_samples_each_trials_threshold_in_its_own_range(tmp_path):
    """End to end: `threshold = "auto"` for steps + magcache. The worker stores the ratios with
    the ranges they give, every trial's threshold lies in the range of the max_skip_steps,
    retention_ratio and step count it drew, every trial skips a step, and `check` and `run` say
    the range per max_skip_steps."""
    text = DBCACHE_SPEC.replace('accelerators = [["dbcache"]]', 'accelerators = [["steps", "magcache"]]') \
        .replace("n_trials = 2", "n_trials = 4") \
        + '[space.magcache]\nthreshold = "auto"\nmax_skip_steps = [1, 4]\n' \
        + "[space.steps]\nnum_inference_steps = [6, 12]\n"
    spec = write_spec(tmp_path / "mag.toml", text)
    url = f"sqlite:///{tmp_path}/mag.db"
    ran = optsearch_cmd("run", str(spec), "--storage", url, "--quiet")
    assert ran.returncode == 0, ran.stderr
    study = optuna.load_study(study_name="flux", storage=url)
    [calibration] = [v for k, v in study.user_attrs.items()
                     if k.startswith("optsearch:calibration:") and k.endswith(":magcache")]
    assert sorted(calibration["by"]["threshold"][1]) == ["1", "2", "3", "4"]
    calibrated = calibrated_range("magcache", calibration, "threshold")
    trials = study.get_trials()
    assert len(trials) == 4
    for trial in trials:
        params = {name.split(".")[1]: value for name, value in trial.params.items()}
        low, high = calibrated.for_setting(params, params["num_inference_steps"])
        assert low <= params["threshold"] <= high, params
        assert trial.user_attrs["compute_fraction"] < 1.0, params
    per_skips = "  per max_skip_steps: 1 [" + ", ".join(map(str, calibration["by"]["threshold"][1]["1"]))
    assert "auto range magcache.threshold on " in ran.stdout and per_skips in ran.stdout
    checked = optsearch_cmd("check", str(spec))
    assert checked.returncode == 0, checked.stderr
    assert "auto range magcache.threshold: [" in checked.stdout and per_skips in checked.stdout
    assert "allow no more skips" in checked.stdout


def test_auto_is_for_the_threshold_only():
    with pytest.raises(SpecError, match='"auto" is for thresholds measured before'):
        spec_from_dict({"model": {"id": "builtin:tiny-flux", "steps": 12},
                        "search": {"accelerators": [["magcache"]]},
                        "space": {"magcache": {"max_skip_steps": "auto"}}})
    spec = spec_from_dict({"model": {"id": "builtin:tiny-flux", "steps": 12},
                           "search": {"accelerators": [["magcache"]]},
                           "space": {"magcache": {"threshold": "auto"}}})
    assert spec.auto_params() == [("magcache", "threshold")]


@pytest.mark.parametrize("family, param, default", [
    ("magcache", "threshold", [0.02, 0.5]),
    ("fbcache", "threshold", [0.02, 0.5]),
    ("dbcache", "residual_diff_threshold", [0.05, 0.3]),
])
@pytest.mark.parametrize("given, sampler, auto", [
    (None, "tpe", True),  # no range given: "auto" (its calibration is in the estimate)
    ([0.02, 0.3], "tpe", False),  # a range given: that range
    (None, "grid", False),  # a grid is fixed at creation: the family's default range
])
def test_a_threshold_is_auto_unless_the_spec_gives_a_range(family, param, default, given, sampler, auto):
    spec = spec_from_dict({"model": {"id": "builtin:tiny-flux", "steps": 12},
                           "search": {"accelerators": [[family]], "sampler": sampler},
                           "space": {family: {param: given}} if given else {}})
    assert (spec.auto_params() == [(family, param)]) is auto
    assert spec.param_range(family, param, {f"{family}.{param}": [0.1, 0.2]})[:2] == \
        ((0.1, 0.2) if auto else tuple(given or default))
    assert (param not in spec.searched_values(family)) is auto

def test_fewer_steps_in_a_first_batch_call_match_the_replay(flux_pipe, ratios):
    """The evaluator's generate path (batches, seeds, `steps` lowering the call) runs what the
    replay says at a step count the ratios were not measured at."""
    config = GenerationConfig(steps=STEPS, guidance_scale=3.5, batch_size=2)
    params = {"threshold": 0.05, "max_skip_steps": 2, "retention_ratio": 0.2}
    setting = {"steps": {"num_inference_steps": 8}, "magcache": params}
    with AppliedSetting(flux_pipe, setting, {"magcache": {"mag_ratios": ratios}}) as applied:
        list(generate(flux_pipe, ["a red cube", "a small boat"], config, setting=applied, warmup=False))
        computed = applied.computed_fraction()
    skipped, _ = magcache.skipped_steps(ratios, 8, **params)
    assert computed == pytest.approx((1 - len(skipped) / 8) * 8 / STEPS)


def _study_after_one_trial(tmp_path, n_trials: int) -> tuple[optuna.Study, str, tuple, str]:
    """A magcache study (max_skip_steps 3, retention 0.2) whose first trial, threshold 0.05, one
    worker ran: (the study, its storage URL, the worker command, the stored calibration's key)."""
    text = DBCACHE_SPEC.replace('accelerators = [["dbcache"]]', 'accelerators = [["magcache"]]') \
        .replace("n_trials = 2", f"n_trials = {n_trials}") \
        + "[space.magcache]\nthreshold = [0.0, 1.0]\nmax_skip_steps = 3\nretention_ratio = 0.2\n"
    return study_after_one_trial(write_spec(tmp_path / "mag.toml", text), "flux",
                                 {"magcache.threshold": 0.05}, "magcache")


def test_a_magcache_setting_that_skips_the_same_steps_is_not_measured_again(tmp_path):
    """Two thresholds between the same two decision points skip the same steps: one computation,
    bit for bit. The second trial copies the first's result without running (its per-batch
    timings are the first's, to the last digit) and keeps its own setting; a threshold that skips
    other steps is measured."""
    study, _, worker, key = _study_after_one_trial(tmp_path, n_trials=3)
    calibration = study.user_attrs[key]

    def skips(threshold: float) -> list[int]:
        return magcache.skipped_steps(calibration["mag_ratios"], STEPS, threshold, 3, 0.2)[0]

    candidates = [t / 1000 for t in range(1, 1000)]
    same = next(t for t in candidates if t != 0.05 and skips(t) == skips(0.05))
    other = next(t for t in candidates if skips(t) != skips(0.05))
    study.enqueue_trial({"magcache.threshold": same})
    study.enqueue_trial({"magcache.threshold": other})
    ran = optsearch_cmd(*worker)
    assert ran.returncode == 0, ran.stderr
    first, copy, measured, drawn = study.get_trials()  # the copy takes no trial of n_trials
    assert "reused_from" not in drawn.user_attrs and skips(drawn.params["magcache.threshold"]) \
        not in (skips(0.05), skips(other))  # an unmeasured computation is measured in its place
    assert copy.user_attrs["reused_from"] == 0 and copy.values == first.values
    assert copy.user_attrs["setting"]["magcache"]["threshold"] == same
    assert copy.user_attrs["batch_seconds"] == first.user_attrs["batch_seconds"]
    assert "same steps skipped" in copy.user_attrs["reused_why"]
    assert "the result of trial 0 (same steps skipped, same device: the same computation)" in ran.stdout
    assert "reused_from" not in measured.user_attrs
    assert measured.user_attrs["batch_seconds"] != first.user_attrs["batch_seconds"]


def test_a_trial_keeps_the_ratios_it_ran_with_for_its_export_and_its_twins(tmp_path):
    """Two workers on one device fingerprint that start together each measure MagCache's ratios,
    and the one stored last is what a later worker loads. A trial records the ratios it ran with:
    its export deploys those, and whether a later setting is the same computation is told by each
    trial's own ratios. Here a second worker loads other ratios (all 1.0: every threshold skips
    as many steps as it may) and its trial is measured, not taken for trial 0's twin."""
    study, url, worker, key = _study_after_one_trial(tmp_path, n_trials=2)
    ran_with = study.trials[0].user_attrs["calibration_used"]["magcache"]["mag_ratios"]
    assert ran_with == study.user_attrs[key]["mag_ratios"]
    study.set_user_attr(key, {"mag_ratios": [1.0] * STEPS})  # another worker's, stored last
    study.enqueue_trial({"magcache.threshold": 0.9})  # saturated with all-1.0 ratios, as 0.05 is
    assert magcache.skipped_steps([1.0] * STEPS, STEPS, 0.05, 3, 0.2)[0] == \
        magcache.skipped_steps([1.0] * STEPS, STEPS, 0.9, 3, 0.2)[0]
    assert magcache.skipped_steps(ran_with, STEPS, 0.05, 3, 0.2)[0] != \
        magcache.skipped_steps([1.0] * STEPS, STEPS, 0.9, 3, 0.2)[0]
    assert optsearch_cmd(*worker).returncode == 0
    first, second = study.get_trials()
    assert "reused_from" not in second.user_attrs
    assert second.user_attrs["calibration_used"]["magcache"]["mag_ratios"] == [1.0] * STEPS
    study.set_user_attr(key, {"mag_ratios": [0.9] * STEPS})  # and a third, stored later still
    exported = tmp_path / "winner.json"
    assert optsearch_cmd("study", "export", "flux", "--storage", url, "-o", str(exported)).returncode == 0
    winner = json.loads(exported.read_text())
    own = {0: ran_with, 1: [1.0] * STEPS}[winner["best"]["trial"]]
    assert winner["calibration"]["magcache"]["mag_ratios"] == own


def test_a_worker_adopts_what_another_stored_since_instead_of_measuring_again(flux_pipe):
    """Workers that start together, or before the first one stored a calibration, would each
    measure their own: the evaluator reads what is stored on its device before measuring anew.
    The ranges and ratios here are made up (a real calibration of tiny FLUX never gives them):
    finding them proves nothing was measured."""
    from optsearch.measure.evaluate import evaluator_from_spec

    data = tomllib.loads(FLUX_SPEC)
    spec = spec_from_dict({**data, "search": {"accelerators": [["fbcache"], ["magcache"]]}})
    stored: dict = {}
    evaluator = evaluator_from_spec(spec, pipe=flux_pipe).derive(stored=lambda: stored)
    assert evaluator.calibration_images(spec) > 0  # nothing stored yet
    stored.update(fbcache={"auto": {"threshold": [0.123, 0.456]}},
                  magcache={"mag_ratios": [1.0] * STEPS, "auto": {"threshold": [0.0, 0.5]}})
    assert evaluator.calibration_images(spec) == 0
    assert evaluator.auto_ranges(spec)["fbcache.threshold"] == [0.123, 0.456]
    with evaluator.apply({"magcache": {"threshold": 0.1}}) as applied:
        assert applied.calibration["magcache"]["mag_ratios"] == [1.0] * STEPS


def test_check_says_when_a_given_threshold_range_lies_outside_the_one_measured(tmp_path):
    """A range the spec gives is searched as given; `check` measures the "auto" one beside it and
    says how much of the given range skips nothing or all it can. On tiny FLUX, DBCache's
    residual differences sit near 0.4-0.6: cache-dit users' [0.05, 0.3] lies wholly below them;
    MagCache saturates on tiny FLUX far under 0.5; FBCache's [0.45, 0.6] lies inside [0.43, 0.62]."""
    text = DBCACHE_SPEC.replace('accelerators = [["dbcache"]]',
                                'accelerators = [["dbcache"], ["magcache"], ["fbcache"]]') \
        + "[space.dbcache]\nresidual_diff_threshold = [0.05, 0.3]\nmax_warmup_steps = 2\n" \
        + "[space.magcache]\nthreshold = [0.02, 0.5]\n[space.fbcache]\nthreshold = [0.45, 0.6]\n"
    checked = optsearch_cmd("check", str(write_spec(tmp_path / "given.toml", text)))
    assert checked.returncode == 0, checked.stderr
    lines = {line.split(" = ")[0]: line for line in checked.stdout.splitlines()
             if line.startswith("space.")}
    assert "100% of the given range lies below it (skips nothing) and 0% above" \
        in lines["space.dbcache.residual_diff_threshold"]
    assert "0% of the given range lies below it" in lines["space.magcache.threshold"]
    above = int(lines["space.magcache.threshold"].split("% above")[0].rsplit(" ", 1)[1])
    assert above > 50 and "leave the range out" in lines["space.magcache.threshold"]
    assert "space.fbcache.threshold" not in lines
