"""cache-dit's Steps Computation Mask (SCM) searched with DBCache: the mask's steps skip as cache-dit
says, the mask follows each call's step count, "static" settings that differ only in what the
mask overrides are one computation (measured once), and the spec refuses what cache-dit cannot run."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from optsearch.accelerators import apply_setting, canonical_setting, dbcache, normalize_setting
from optsearch.study_spec import SpecError, spec_from_dict

from .conftest import generate_images, optsearch_cmd, write_spec
from .test_families import DBCACHE_SPEC, PROMPTS, _flux_dict, flux_pipe  # noqa: F401 - a fixture


def _masked(mask: str, policy: str, threshold: float, **more) -> dict:
    return normalize_setting({"dbcache": {"Fn_compute_blocks": 1, "residual_diff_threshold": threshold,
                                          "max_warmup_steps": 2, "steps_computation_mask": mask,
                                          "steps_computation_policy": policy, **more}})


def _cached_steps(pipe) -> list[int]:
    """The steps cache-dit itself says its last call served from the cache."""
    import cache_dit

    stats = [s for s in cache_dit.summary(pipe, logging=False) if s.cache_options]
    return sorted({int(step) for stat in stats for step in (stat.cached_steps or [])})


def test_a_static_mask_skips_exactly_the_masks_steps_at_each_calls_step_count(flux_pipe):  # noqa: F811
    plain = generate_images(flux_pipe, PROMPTS, steps=12)
    for steps in (12, 9):  # one patch, two step counts: the mask is rebuilt for the second
        mask = dbcache.steps_mask("fast", steps)
        assert 0 < mask.count(0) < steps
        with apply_setting(flux_pipe, _masked("fast", "static", 0.001)) as fast:
            if steps == 9:
                generate_images(fast, PROMPTS[:1], steps=12)  # built at 12 first
            images = generate_images(fast, PROMPTS, steps=steps)
            assert _cached_steps(flux_pipe) == [i for i, computes in enumerate(mask) if not computes]
            fraction = fast.computed_fraction()
        assert 0.2 < fraction < 1.0
    # the threshold does nothing under "static": a huge one gives the very same images
    with apply_setting(flux_pipe, _masked("fast", "static", 10.0)) as fast:
        assert np.array_equal(generate_images(fast, PROMPTS, steps=9), images)
    # under "dynamic" the threshold decides on the mask's other steps: a tiny one skips nothing
    with apply_setting(flux_pipe, _masked("fast", "dynamic", 1e-6)) as fast:
        generate_images(fast, PROMPTS, steps=12)
        assert _cached_steps(flux_pipe) == [] and fast.computed_fraction() == 1.0
    with apply_setting(flux_pipe, _masked("fast", "dynamic", 10.0)) as fast:  # and a huge one all
        assert np.array_equal(generate_images(fast, PROMPTS, steps=9), images)
    # with a mask the warm-up does nothing (it lies inside the mask's first computed steps)
    outputs = []
    for warmup, interval in ((0, 1), (6, 2)):
        with apply_setting(flux_pipe, _masked("fast", "dynamic", 0.5, max_warmup_steps=warmup,
                                              warmup_interval=interval)) as fast:
            outputs.append(generate_images(fast, PROMPTS, steps=12))
            assert 0 < len(_cached_steps(flux_pipe)) <= dbcache.steps_mask("fast", 12).count(0)
    assert np.array_equal(*outputs)
    assert np.array_equal(generate_images(flux_pipe, PROMPTS, steps=12), plain)  # restored exactly


def test_what_a_mask_makes_irrelevant_is_not_drawn_and_not_part_of_the_computation():
    assert dbcache.inactive({"steps_computation_mask": "none"}) == {"steps_computation_policy"}
    assert dbcache.inactive({"steps_computation_mask": "fast"}) == {"max_warmup_steps", "warmup_interval"}
    assert dbcache.inactive({"steps_computation_mask": "fast", "steps_computation_policy": "static"}) \
        == {"max_warmup_steps", "warmup_interval", "residual_diff_threshold", "max_cached_steps",
            "max_continuous_cached_steps"}
    static = canonical_setting(_masked("fast", "static", 0.3, max_cached_steps=2), 12, {})
    assert static == canonical_setting(_masked("fast", "static", 0.5), 12, {})
    assert static != canonical_setting(_masked("ultra", "static", 0.3), 12, {})
    assert static != canonical_setting(_masked("fast", "static", 0.3, Bn_compute_blocks=1), 12, {})
    assert canonical_setting(_masked("fast", "dynamic", 0.3), 12, {}) \
        != canonical_setting(_masked("fast", "dynamic", 0.5), 12, {})
    assert canonical_setting(_masked("fast", "dynamic", 0.3, max_warmup_steps=2), 12, {}) \
        == canonical_setting(_masked("fast", "dynamic", 0.3, max_warmup_steps=3), 12, {})
    # without a mask the policy does nothing, and the warm-up counts
    assert canonical_setting(_masked("none", "static", 0.3), 12, {}) \
        == canonical_setting(_masked("none", "dynamic", 0.3), 12, {})
    assert canonical_setting(_masked("none", "dynamic", 0.3, max_warmup_steps=3), 12, {}) \
        != canonical_setting(_masked("none", "dynamic", 0.3), 12, {})
    # fast at 12 steps and at 16 are other masks; "slow" and "medium" at 4 steps are the same one
    at = {"steps": {"num_inference_steps": 4}}
    assert canonical_setting({**at, **_masked("slow", "static", 0.3)}, 12, {}) \
        == canonical_setting({**at, **_masked("medium", "static", 0.3)}, 12, {})
    assert canonical_setting({"steps": {"num_inference_steps": 16}, **_masked("fast", "static", 0.3)},
                             20, {}) != canonical_setting(_masked("fast", "static", 0.3), 20, {})


SCM_SPEC = DBCACHE_SPEC.replace("n_trials = 2", "n_trials = 3") + """
[space.dbcache]
Fn_compute_blocks = 1
max_warmup_steps = 2
steps_computation_mask = ["none", "slow", "medium", "fast", "ultra"]
steps_computation_policy = ["dynamic", "static"]
"""


def test_a_study_searches_the_masks_as_a_conditional_space_and_measures_a_twin_once(tmp_path):
    """The mask and policy are Optuna categoricals; a static trial draws no threshold, a trial
    without a mask no policy; at 6 steps "slow" and "medium" are one mask (cache-dit's), so the
    second trial copies the first's result (same steps skipped)."""
    url = f"sqlite:///{tmp_path}/scm.db"
    spec = write_spec(tmp_path / "scm.toml", SCM_SPEC.replace("steps = 12", "steps = 6"))
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    study = optuna.load_study(study_name="flux", storage=url)
    for mask in ("slow", "medium", "none"):
        study.enqueue_trial({"dbcache.steps_computation_mask": mask,
                             "dbcache.steps_computation_policy": "static",
                             "dbcache.residual_diff_threshold": 0.45})
    ran = optsearch_cmd("worker", "--study", "flux", "--storage", url, "--quiet",
                        "--artifact-dir", str(tmp_path / "art"))
    assert ran.returncode == 0, ran.stderr
    slow, medium, unmasked, drawn = study.get_trials()  # the copy takes no trial of n_trials:
    assert "reused_from" not in drawn.user_attrs  # an unmeasured setting is measured in its place
    assert dbcache.computation(drawn.user_attrs["setting"]["dbcache"], 6) not in (
        dbcache.computation(t.user_attrs["setting"]["dbcache"], 6) for t in (slow, unmasked))
    assert dbcache.steps_mask("slow", 6) == dbcache.steps_mask("medium", 6)
    assert isinstance(slow.distributions["dbcache.steps_computation_mask"],
                      optuna.distributions.CategoricalDistribution)
    assert set(slow.distributions["dbcache.steps_computation_mask"].choices) == set(dbcache.MASK_POLICIES)
    assert "dbcache.residual_diff_threshold" not in slow.params  # static: the mask decides
    assert "residual_diff_threshold" not in slow.user_attrs["setting"]["dbcache"]
    assert "reused_from" not in slow.user_attrs and slow.user_attrs["compute_fraction"] < 1.0
    assert medium.user_attrs["reused_from"] == slow.number
    assert medium.user_attrs["reused_why"] == "same steps skipped, same device: the same computation"
    assert medium.user_attrs["setting"]["dbcache"]["steps_computation_mask"] == "medium"
    assert medium.user_attrs["batch_seconds"] == slow.user_attrs["batch_seconds"]
    assert "steps_computation_mask=slow, steps_computation_policy=static" in ran.stdout
    assert "dbcache.steps_computation_policy" not in unmasked.params  # no mask: no policy
    assert unmasked.params["dbcache.residual_diff_threshold"] > 0 and "reused_from" not in unmasked.user_attrs
    assert "steps_computation_policy" not in unmasked.user_attrs["setting"]["dbcache"]


@pytest.mark.parametrize("space, message", [
    ({"steps_computation_mask": ["none", "turbo"]},
     "space.dbcache.steps_computation_mask: 'turbo' is not one of 'none', 'slow', 'medium', "
     "'fast', 'ultra'"),
    ({"steps_computation_mask": ["fast", "fast"]}, "names a choice twice"),
    ({"steps_computation_policy": 1}, "1 is not one of 'dynamic', 'static'"),
    ({"steps_computation_mask": "fast"}, None),  # one name: fixed
])
def test_mask_choices_in_a_spec(space, message):
    raw = {**_flux_dict([["dbcache"]]), "space": {"dbcache": space}}
    if message is None:
        assert spec_from_dict(raw).param_range("dbcache", "steps_computation_mask") == ("fast",)
        return
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        spec_from_dict(raw)


def test_a_mask_at_a_step_count_cache_dit_has_none_for_is_a_spec_error(tmp_path):
    raw = {**_flux_dict([["steps", "dbcache"]]),
           "space": {"dbcache": {"steps_computation_mask": ["none", "fast"]},
                     "steps": {"num_inference_steps": [6, 10]}}}
    with pytest.raises(SpecError, match="space.dbcache.steps_computation_mask: 'fast' needs 4, 6 "
                                        "or 8 and more steps .*; trials would run 7"):
        spec_from_dict(raw)
    spec_from_dict({**raw, "space": {**raw["space"], "steps": {"num_inference_steps": [8, 10]}}})
    text = SCM_SPEC.replace("steps = 12", "steps = 7")
    checked = optsearch_cmd("study", "create", str(write_spec(tmp_path / "seven.toml", text)),
                            "--storage", f"sqlite:///{tmp_path}/seven.db")
    assert checked.returncode == 2 and len(checked.stderr.strip().splitlines()) == 1, checked.stderr
    assert "trials would run 7" in checked.stderr
    with pytest.raises(ValueError, match="needs 4, 6 or 8 and more steps"):
        dbcache.steps_mask("fast", 7)


def test_evaluate_takes_a_mask_by_name_and_refuses_an_unknown_one_in_one_line(tmp_path):
    spec = write_spec(tmp_path / "scm.toml", SCM_SPEC)
    bad = optsearch_cmd("evaluate", str(spec), "--set", "dbcache.steps_computation_mask=turbo", "--quiet")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "dbcache.steps_computation_mask='turbo' must be one of 'none', 'slow'" in bad.stderr
    numeric = optsearch_cmd("evaluate", str(spec), "--set", "dbcache.Fn_compute_blocks=one", "--quiet")
    assert numeric.returncode == 2 and "dbcache.Fn_compute_blocks='one' must be an integer" in numeric.stderr


def test_a_dynamic_masks_threshold_range_starts_where_its_own_steps_can_skip(flux_pipe):  # noqa: F811
    """Under a dynamic mask only the mask's other steps can skip: a threshold between the Fn's
    range's low end and the least difference on those steps skipped nothing (tiny FLUX, "fast"
    at 12 steps). The trial's own range starts there, and every threshold in it skips."""
    def run_once():
        generate_images(flux_pipe, PROMPTS, steps=12)

    calibration = dbcache.calibrate(flux_pipe, run_once, {"Fn_compute_blocks": [1]}, 12)
    values = {"Fn_compute_blocks": 1, "steps_computation_mask": "fast",
              "steps_computation_policy": "dynamic"}
    per_fn = calibration["by"]["residual_diff_threshold"][1]["1"]
    own = dbcache.range_for(calibration, values, None)
    assert own[0] > per_fn[0] and own[1] == per_fn[1]
    assert dbcache.range_for(calibration, {**values, "steps_computation_mask": "none"}, None) == per_fn

    def skipped_steps(threshold: float) -> int:
        with apply_setting(flux_pipe, _masked("fast", "dynamic", threshold, max_warmup_steps=0)) as fast:
            generate_images(fast, PROMPTS, steps=12)
            return len(_cached_steps(flux_pipe))

    assert skipped_steps((per_fn[0] + own[0]) / 2) == 0  # inside the Fn's range, below its own
    assert all(skipped_steps(own[0] + share * (own[1] - own[0])) > 0 for share in (0.05, 0.5, 0.95))


def test_a_dynamic_masks_range_between_the_calibrated_step_counts_reads_their_steps(flux_pipe):  # noqa: F811
    """A steps + dbcache trial at a count no calibration ran (10, between 6 and 20): the per-Fn
    blend of the two ranges knows nothing of the mask and started below every step the mask
    lets skip (benchmarks: 24 of 288 such trials inert); read step by step from the two runs, the
    trial's range starts above, and every threshold in it skips."""
    from optsearch.accelerators import CalibratedRange, calibrate_family

    calibration = calibrate_family("dbcache", flux_pipe, lambda count: generate_images(
        flux_pipe, PROMPTS, steps=count), {"Fn_compute_blocks": [1]}, [20, 6])
    values = {"Fn_compute_blocks": 1, "steps_computation_mask": "fast",
              "steps_computation_policy": "dynamic"}
    blend = CalibratedRange.stored(calibration, "residual_diff_threshold").for_setting(values, 10)
    own = dbcache.range_for(calibration, values, 10)
    assert own[0] > blend[0], (own, blend)

    def skipped_steps(threshold: float) -> int:
        with apply_setting(flux_pipe, _masked("fast", "dynamic", threshold, max_warmup_steps=0)) as fast:
            generate_images(fast, PROMPTS, steps=10)
            return len(_cached_steps(flux_pipe))

    assert skipped_steps(blend[0] + 0.05 * (blend[1] - blend[0])) == 0  # the blend's low end: inert
    assert all(skipped_steps(own[0] + share * (own[1] - own[0])) > 0 for share in (0.05, 0.5, 0.95))


def test_check_says_what_each_searched_mask_computes_at_the_step_counts_trials_run(tmp_path):
    text = SCM_SPEC.replace('accelerators = [["dbcache"]]', 'accelerators = [["steps", "dbcache"]]') \
        + "[space.steps]\nnum_inference_steps = [8, 12]\n"
    checked = optsearch_cmd("check", str(write_spec(tmp_path / "scm.toml", text)))
    assert checked.returncode == 0, checked.stderr
    assert "cache-dit steps masks at 12 steps, steps computed in full: slow 10, medium 8, fast 7, " \
           "ultra 6 (of 12;" in checked.stdout
    assert "cache-dit steps masks at 8 steps, steps computed in full: slow 7, medium 6, fast 5, " \
           "ultra 4 (of 8;" in checked.stdout
