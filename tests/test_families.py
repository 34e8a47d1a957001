"""Accelerator families beyond the SD UNet (issue 10): fewer steps, diffusers' caches on a tiny
FLUX, PAB on the SD UNet, which families apply where, and the fewer-steps reference line."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib

import numpy as np
import optuna
import pytest
import torch

import optsearch
from optsearch.accelerators import (
    AppliedSetting,
    CalibratedRange,
    applicable,
    dbcache,
    denoiser,
    fit_to_steps,
    magcache,
    pipeline_kind,
)
from optsearch.measure.generation import generate
from optsearch.measure.models import load_pipeline, model_kind
from optsearch.measure.prompts import prompt_seed
from optsearch.study_spec import SpecError, spec_from_dict

from .conftest import TINY_SPEC, generate_images, optsearch_cmd, write_spec

PROMPTS = ["a red bus in the rain", "a small cat on a sofa"]

FLUX_SPEC = """
name = "flux"
[model]
id = "builtin:tiny-flux"
device = "cpu"
steps = 12
guidance_scale = 3.5
[prompts]
source = "builtin"
num_samples = 4
batch_size = 2
[quality]
clip_model = "builtin:tiny"
clip_pretrained = "none"
metric = "psnr"
limit = 35.0
[search]
accelerators = [["steps"], ["magcache"], ["steps", "taylorseer"]]
n_trials = 6
n_startup_trials = 6
seed = 1
"""


@pytest.fixture(scope="module")
def flux_pipe():
    return load_pipeline("builtin:tiny-flux", device="cpu", dtype="float32")


def _hook_state(module) -> set:
    """What diffusers' hooks leave on modules: instance forwards, registries, cache configs."""
    return {(name, key) for name, m in module.named_modules() for key in m.__dict__
            if key in ("forward", "_diffusers_hook", "_cache_config")}


def _flux_images(call, steps=12):
    return generate_images(call, PROMPTS, steps=steps)


FLUX_SETTINGS = {
    "fbcache": {"fbcache": {"threshold": 0.6}},
    "taylorseer": {"taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2}},
    "pab": {"pab": {"spatial_attention_block_skip_range": 2, "timestep_skip_high": 1000}},
    "magcache": {"magcache": {"threshold": 0.5, "max_skip_steps": 3, "retention_ratio": 0.1}},
    "steps": {"steps": {"num_inference_steps": 6}},
    "dbcache": {"dbcache": {"residual_diff_threshold": 0.6, "max_warmup_steps": 2,
                            "taylorseer_order": 1}},
}


@pytest.mark.parametrize("family", list(FLUX_SETTINGS))
def test_every_family_changes_flux_and_restores_exactly(flux_pipe, family):
    baseline = _flux_images(flux_pipe)
    hooks_before = _hook_state(denoiser(flux_pipe))
    # the order diffusers' FirstBlockCache finds blocks in (cache-dit re-adds its block lists)
    order_before = [name for name, _ in denoiser(flux_pipe).named_modules()]
    calibration = {}
    if family == "magcache":
        ratios = magcache.measure(flux_pipe, 12, lambda: _flux_images(flux_pipe))["mag_ratios"]
        assert len(ratios) == 12 and ratios[0] == 1.0 and len(set(ratios)) > 2
        calibration = {"magcache": {"mag_ratios": ratios}}
    with AppliedSetting(flux_pipe, FLUX_SETTINGS[family], calibration) as applied:
        accelerated = _flux_images(applied)
        again = _flux_images(applied)  # hook state is reset between calls
        computed = applied.computed_fraction()  # the share of the transformer it really ran
        assert 0.0 < computed < 1.0, computed
    after = _flux_images(flux_pipe)
    # random weights change images little; a no-op changes them not at all (restore is exact)
    assert np.abs(accelerated - baseline).max() > 1e-4, f"{family} left the images unchanged"
    np.testing.assert_array_equal(again, accelerated)
    np.testing.assert_allclose(after, baseline, atol=1e-5)
    assert _hook_state(denoiser(flux_pipe)) == hooks_before
    assert [name for name, _ in denoiser(flux_pipe).named_modules()] == order_before


def test_pab_changes_the_sd_unet_and_restores_exactly(tiny_pipe):
    before = {(n, k) for n, m in tiny_pipe.unet.named_modules() for k in m.__dict__}
    baseline = generate_images(tiny_pipe, PROMPTS, steps=10)
    setting = {"pab": {"spatial_attention_block_skip_range": 3, "timestep_skip_high": 1000}}
    with AppliedSetting(tiny_pipe, setting) as applied:
        accelerated = generate_images(applied, PROMPTS, steps=10)
    after = generate_images(tiny_pipe, PROMPTS, steps=10)
    assert np.abs(accelerated - baseline).max() > 1e-3, "PAB is a no-op on the SD UNet"
    np.testing.assert_array_equal(after, baseline)
    assert {(n, k) for n, m in tiny_pipe.unet.named_modules() for k in m.__dict__} == before
    assert not tiny_pipe.unet._forward_pre_hooks  # the timestep probe is gone


@pytest.mark.parametrize("family, params", [
    ("deepcache", {"cache_interval": 3, "cache_branch_id": 0}),
    ("tgate", {"gate_step": 4}),
])
def test_steps_combined_runs_the_family_at_the_settings_step_count(tiny_pipe, family, params):
    """steps + X called at model.steps is exactly X run at the fewer steps."""
    with AppliedSetting(tiny_pipe, {"steps": {"num_inference_steps": 7}, family: params}) as run:
        combined = generate_images(run, PROMPTS, steps=14)
    with AppliedSetting(tiny_pipe, {family: params}) as run:
        direct = generate_images(run, PROMPTS, steps=7)
    np.testing.assert_array_equal(combined, direct)


def test_step_counted_parameters_are_clipped_to_the_settings_steps():
    sampled = {"steps": {"num_inference_steps": 6}, "tgate": {"gate_step": 15},
               "deepcache": {"cache_interval": 8, "cache_branch_id": 1}}
    fitted = fit_to_steps(sampled, model_steps=20)
    assert fitted["tgate"]["gate_step"] == 6 and fitted["deepcache"]["cache_interval"] == 6
    assert fitted["deepcache"]["cache_branch_id"] == 1 and sampled["tgate"]["gate_step"] == 15


def test_families_per_kind_and_kind_from_the_model():
    assert applicable("unet") == ["distill", "steps", "deepcache", "tome", "tgate", "pab"]
    assert applicable("transformer") == ["distill", "steps", "pab", "fastercache", "fbcache", "taylorseer",
                                         "magcache", "dbcache"]
    assert applicable("video") == [*applicable("transformer"), "seacache"]
    assert model_kind("builtin:tiny-flux") == "transformer"
    assert model_kind("black-forest-labs/FLUX.1-dev") == "transformer"
    assert model_kind("stable-diffusion-v1-5/stable-diffusion-v1-5") == "unet"
    assert model_kind("my_package.pipes:build") is None


def test_model_kind_reads_a_local_folders_model_index(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    assert model_kind(str(tmp_path)) == "transformer"


def _flux_dict(accelerators, **model) -> dict:
    return {"model": {"id": "builtin:tiny-flux", "steps": 12, **model},
            "search": {"accelerators": accelerators}}


@pytest.mark.parametrize("data, message", [
    (_flux_dict(["deepcache"]), "deepcache does not apply to this model (transformer pipeline; "
                                "families that do: distill, steps, pab, fastercache, fbcache, taylorseer, "
                                "magcache, dbcache)"),
    ({"model": {"id": "builtin:tiny"}, "search": {"accelerators": ["dbcache"]}},
     "dbcache does not apply to this model (unet pipeline; families that do: distill, steps, deepcache"),
    ({"model": {"id": "builtin:tiny"}, "search": {"accelerators": ["fbcache"]}},
     "fbcache does not apply to this model (unet pipeline; families that do: distill, steps, deepcache"),
    (_flux_dict(["fbcache", "taylorseer"]), "fbcache combines only with steps"),
    ({"model": {"id": "builtin:tiny"}, "search": {"accelerators": ["deepcache", "pab"]}},
     "pab combines only with steps"),
    ({**_flux_dict(["steps"]), "space": {"steps": {"num_inference_steps": [4, 20]}}},
     "space.steps.num_inference_steps: [4, 20] goes past model.steps=12"),
    (_flux_dict(["steps"], kind="dit"), "model.kind: unknown kind 'dit'"),
    ({"model": {"id": "builtin:tiny-flux", "steps": 12},
      "search": {"accelerators": ["dbcache"], "sampler": "grid"},
      "space": {"dbcache": {"residual_diff_threshold": "auto"}}},  # ran the default grid: inert
     'space.dbcache.residual_diff_threshold: "auto" is measured by each worker on its device, a '
     "grid is fixed when the study is created: give it a range [low, high, step]"),
])
def test_families_that_do_not_apply_are_one_line_spec_errors(data, message):
    with pytest.raises(SpecError) as raised:
        spec_from_dict(data)
    assert any(message in line for line in raised.value.problems), raised.value.problems


def test_any_means_the_applicable_combos_of_the_models_kind():
    flux = spec_from_dict(_flux_dict("any"))
    assert flux.search.combos == [("steps",), ("fbcache",), ("taylorseer",), ("pab",),
                                  ("magcache",), ("dbcache",)]
    unet = spec_from_dict({"model": {"id": "builtin:tiny"}, "search": {"accelerators": "any"}})
    assert [len(c) for c in unet.search.combos] == [1, 2, 2, 3] and "steps" not in unet.accelerators_used
    assert flux.param_range("steps", "num_inference_steps") == (3, 12, None)  # a quarter to all


def test_a_wrongly_told_kind_fails_at_load_before_anything_is_measured(flux_pipe):
    """A ModelLoadError (one line, exit 2) as soon as the pipeline is loaded."""
    from optsearch.errors import exit_code_for
    from optsearch.measure.models import ModelLoadError
    from optsearch.measure.served import check_families

    spec = spec_from_dict({"model": {"id": "builtin:tiny-flux", "kind": "unet"},
                           "search": {"accelerators": ["deepcache"]}})
    with pytest.raises(ModelLoadError) as raised:
        check_families(flux_pipe, spec)
    assert "deepcache does not apply to this model (transformer pipeline" in str(raised.value)
    assert exit_code_for(raised.value) == 2


def test_more_dbcache_blocks_than_the_transformer_holds_fail_at_load(flux_pipe, tmp_path):
    """cache-dit caches tiny FLUX's 6 blocks as one list and asserts Fn and Bn fit in it; a study
    searching Fn up to 8 (the shipped real-model specs' range) ended the worker with that
    AssertionError after the baseline was timed. Now one line, exit 2, at load."""
    from optsearch.errors import exit_code_for
    from optsearch.measure.models import ModelLoadError
    from optsearch.measure.served import check_families

    hooks_before = _hook_state(denoiser(flux_pipe))
    spec = spec_from_dict({**_flux_dict([["dbcache"]]),
                           "space": {"dbcache": {"Fn_compute_blocks": [1, 8]}}})
    with pytest.raises(ModelLoadError) as raised:
        check_families(flux_pipe, spec)
    assert "dbcache: Fn_compute_blocks = 8 exceeds the 6 blocks cache-dit caches in " \
           "FluxTransformer2DModel (at most 6)" in str(raised.value)
    assert exit_code_for(raised.value) == 2
    check_families(flux_pipe, spec_from_dict({**_flux_dict([["dbcache"]]), "space": {
        "dbcache": {"Fn_compute_blocks": [1, 6], "Bn_compute_blocks": [0, 6]}}}))  # fits
    # counting the blocks built cache-dit's adapter, which patches the transformer: undone, so
    # the baseline runs the plain forward (it once kept cache-dit's)
    assert _hook_state(denoiser(flux_pipe)) == hooks_before
    text = DBCACHE_SPEC + '[space.dbcache]\nFn_compute_blocks = [1, 8]\n'
    url = f"sqlite:///{tmp_path}/db.db"
    ran = optsearch_cmd("run", str(write_spec(tmp_path / "db.toml", text)), "--storage", url, "--quiet")
    assert ran.returncode == 2 and "Fn_compute_blocks = 8 exceeds the 6 blocks" in ran.stderr, ran.stderr
    assert "Traceback" not in ran.stderr
    # one setting, given by hand: said before the baseline is timed (cache-dit's assertion at the
    # first call was exit 1)
    ran = optsearch_cmd("evaluate", str(write_spec(tmp_path / "one.toml", DBCACHE_SPEC)),
                        "--set", "dbcache.Bn_compute_blocks=7", "--quiet")
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.strip() == "optsearch: error: --set: dbcache: Bn_compute_blocks = 7 exceeds " \
        "the 6 blocks cache-dit caches in FluxTransformer2DModel (at most 6)"


@pytest.mark.parametrize("sets, message", [
    (["fbcache.threshold=0.1"], "fbcache does not apply to this model (unet pipeline"),
    (["steps.num_inference_steps=20"], "steps.num_inference_steps=20 must be <= model.steps=8"),
])
def test_evaluate_set_rejects_families_and_step_counts_that_do_not_fit(tmp_path, sets, message):
    text = TINY_SPEC.replace('accelerators = ["deepcache", "tome"]',
                             'accelerators = [["steps"], ["deepcache", "tome"]]')
    spec = write_spec(tmp_path / "t.toml", text)
    result = optsearch_cmd("evaluate", str(spec), *(f"--set={s}" for s in sets), "--quiet")
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_a_flux_study_runs_end_to_end_against_the_fewer_steps_line(tmp_path):
    """`optsearch run` on builtin:tiny-flux: MagCache calibrated once and stored, step-counted
    parameters fitted to each trial's steps, the fewer-steps line in show and export."""
    spec = write_spec(tmp_path / "flux.toml", FLUX_SPEC)
    url = f"sqlite:///{tmp_path}/flux.db"
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    # steps-only points surely faster than the baseline: the line is never empty (one point
    # alone read 1.5-1.8x here and was missing once in CI, under timing noise)
    for steps in (3, 6):
        optuna.load_study(study_name="flux", storage=url).enqueue_trial(
            {"combo": "steps", "steps.num_inference_steps": steps})
    result = optsearch_cmd("run", str(spec), "--storage", url, "--quiet",
                           "--artifact-dir", str(tmp_path / "art"))
    assert result.returncode == 0, result.stderr
    assert "reference: fewer steps only" in result.stdout
    assert "(attention" not in result.stdout  # torch's default SDPA is not worth a mention

    study = optuna.load_study(study_name="flux", storage=url)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    combos = {t.user_attrs["combo"] for t in trials}
    assert combos <= {"steps", "magcache", "steps+taylorseer"} and "steps" in combos
    for trial in trials:
        setting = trial.user_attrs["setting"]
        steps = setting.get("steps", {}).get("num_inference_steps", 12)
        assert setting.get("taylorseer", {}).get("disable_cache_before_step", 0) <= steps
    calibrations = [v for k, v in study.user_attrs.items() if k.startswith("optsearch:calibration:")]
    if "magcache" in combos:
        assert len(calibrations) == 1 and len(calibrations[0]["mag_ratios"]) == 12

    out = tmp_path / "sp.json"
    assert optsearch_cmd("study", "export", "flux", "--storage", url, "-o", str(out)).returncode == 0
    exported = json.loads(out.read_text())
    frontier = exported["fewer_steps"]["frontier"]
    seen = [(t.number, t.state.name, t.user_attrs.get("setting"), t.user_attrs.get("speedup"),
             t.user_attrs.get("early_stop_reason") or t.user_attrs.get("fail_reason"))
            for t in study.get_trials()]
    assert frontier, (exported["fewer_steps"], seen)
    assert all(p["trial"] in {t.number for t in trials} for p in frontier)
    speedups = [p["speedup"] for p in frontier]
    assert speedups == sorted(speedups, reverse=True)  # fastest first, quality rising
    for point in frontier:  # each figure with how sure it is, in the export and in show's table
        assert point["psnr_low"] < point["psnr"] < point["psnr_high"]
        row = next(line for line in result.stdout.splitlines() if re.match(rf"\d+ +{point['trial']} ", line))
        assert f"{point['psnr']:.3f} [{point['psnr_low']:.3f}, {point['psnr_high']:.3f}]" in row
    verdict = exported["fewer_steps"]["best"]
    assert verdict["margin"] == pytest.approx(
        exported["best"]["metrics"]["speedup"] / verdict["reference_speedup"])
    # the dashboard's winner note says the verdict as `study show` does
    from optuna_dashboard import get_note

    shown = [line.split(" ", 3)[3] for line in result.stdout.splitlines()
             if line.startswith("winner trial ")]  # "winner trial N <verdict>"
    assert shown and f"- {shown[-1]} (search figures)" in get_note(study)


def test_pipeline_kind_of_the_builtins(flux_pipe, tiny_pipe):
    assert pipeline_kind(flux_pipe) == "transformer" and pipeline_kind(tiny_pipe) == "unet"


DBCACHE_SPEC = FLUX_SPEC.replace('accelerators = [["steps"], ["magcache"], ["steps", "taylorseer"]]',
                                 'accelerators = [["dbcache"]]') \
    .replace("n_trials = 6\nn_startup_trials = 6", "n_trials = 2\nwarm_start = []") \
    .replace("limit = 35.0", "limit = 5.0")


def test_a_dbcache_trial_that_skips_nothing_is_stopped_as_inert(tmp_path):
    """On the random-weight tiny FLUX the residual differences lie near 0.4-0.6: a threshold of
    0.05 never skips (the baseline plus hook overhead) and stops after its first batch; 0.7
    skips, and the trial records how much of the transformer it actually ran. (A range given:
    under "auto", the default, 0.05 would lie outside it and be sampled anew.)"""
    spec = write_spec(tmp_path / "db.toml",
                      DBCACHE_SPEC + "[space.dbcache]\nresidual_diff_threshold = [0.05, 0.3]\n")
    url = f"sqlite:///{tmp_path}/db.db"
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    study = optuna.load_study(study_name="flux", storage=url)
    for threshold in (0.05, 0.7):
        study.enqueue_trial({"dbcache.Fn_compute_blocks": 1, "dbcache.Bn_compute_blocks": 0,
                             "dbcache.residual_diff_threshold": threshold,
                             "dbcache.max_warmup_steps": 2})
    ran = optsearch_cmd("worker", "--study", "flux", "--storage", url, "--quiet",
                        "--artifact-dir", str(tmp_path / "art"))
    assert ran.returncode == 0, ran.stderr
    inert, skipping = study.get_trials()[:2]  # the two enqueued (a failed one would be sampled anew)
    assert inert.state == optuna.trial.TrialState.PRUNED, inert.user_attrs
    assert inert.user_attrs["early_stop_reason"] == "inert" and inert.user_attrs["batches_evaluated"] == 1
    assert inert.user_attrs["compute_fraction"] == 1.0
    # the worker's line names what the study searches, not the fixed rest (in the export)
    assert ": trial 0 dbcache(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.050, " \
           "max_warmup_steps=2): " in ran.stdout, ran.stdout
    assert "warmup_interval" not in ran.stdout and "warmup_interval" in json.dumps(inert.user_attrs)
    assert skipping.state == optuna.trial.TrialState.COMPLETE, skipping.user_attrs
    assert 0.2 < skipping.user_attrs["compute_fraction"] < 1.0
    # show's per-combo table lists only settings faster than the baseline, which one tiny trial
    # on a loaded CPU need not be: its record, read 2x, stands in for it there
    study.add_trial(optuna.trial.create_trial(value=2.0, user_attrs={
        **skipping.user_attrs, "speedup": 2.0, "speedup_low": 1.9, "speedup_high": 2.1}))
    shown = optsearch_cmd("study", "show", "flux", "--storage", url)
    assert "early stop (inert): 1 trials" in shown.stdout
    computed = f"{100 * skipping.user_attrs['compute_fraction']:.0f}%"
    assert any(line.startswith("dbcache") and computed in line for line in shown.stdout.splitlines())


def test_an_auto_threshold_range_is_calibrated_on_the_device_before_the_first_trial(tmp_path):
    """`residual_diff_threshold = "auto"`: a plain call per Fn value searched measures the
    residual differences DBCache compares, each Fn's range runs from their minimum past the
    warm-up (skips nothing) to their maximum, they are stored per device fingerprint and shown,
    and every trial's threshold lies in the range of the Fn it drew at the step count it drew
    (calibrated again at the fewest steps searched, blended in between)."""
    text = DBCACHE_SPEC.replace("n_trials = 2", "n_trials = 3") \
        .replace('accelerators = [["dbcache"]]', 'accelerators = [["steps", "dbcache"]]') \
        + '[space.dbcache]\nresidual_diff_threshold = "auto"\nmax_warmup_steps = 2\n' \
        + "[space.steps]\nnum_inference_steps = [6, 12]\n"
    spec = write_spec(tmp_path / "auto.toml", text)
    url = f"sqlite:///{tmp_path}/auto.db"
    ran = optsearch_cmd("run", str(spec), "--storage", url, "--quiet",
                        "--artifact-dir", str(tmp_path / "art"))
    assert ran.returncode == 0, ran.stderr
    study = optuna.load_study(study_name="flux", storage=url)
    [calibration] = [v for k, v in study.user_attrs.items()
                     if k.startswith("optsearch:calibration:") and k.endswith(":dbcache")]
    low, high = calibration["auto"]["residual_diff_threshold"]
    assert 0.2 < low < high < 1.0  # tiny FLUX's random weights: differences near 0.4-0.6
    by, per_fn = calibration["by"]["residual_diff_threshold"]
    assert by == "Fn_compute_blocks" and sorted(per_fn) == ["1", "2", "3", "4"]  # its default range
    assert low == min(lo for lo, _ in per_fn.values()) and high == max(hi for _, hi in per_fn.values())
    assert len({tuple(bounds) for bounds in per_fn.values()}) == 4  # each Fn its own scale
    assert calibration["observed"]["min_past_warmup"] == pytest.approx(per_fn["1"][0], abs=1e-4)
    assert calibration["observed"]["min"] <= per_fn["1"][0] and calibration["observed"]["past_warmup"] == 2
    assert sorted(calibration["at_steps"]) == ["12", "6"]
    assert calibration["at_steps"]["12"]["by"] == calibration["by"]
    calibrated = CalibratedRange.stored(calibration, "residual_diff_threshold")
    trials = study.get_trials()
    assert len(trials) == 3
    for trial in trials:
        fn, steps = trial.params["dbcache.Fn_compute_blocks"], trial.params["steps.num_inference_steps"]
        fn_low, fn_high = calibrated.for_setting({"Fn_compute_blocks": fn}, steps=steps)
        assert fn_low <= trial.params["dbcache.residual_diff_threshold"] <= fn_high
    assert "auto range dbcache.residual_diff_threshold on" in ran.stdout
    [start] = [line for line in ran.stdout.splitlines() if "trials to go" in line]
    assert ', after ' in start and ' calibrating "auto" ranges: ' in start  # said before the wait
    assert f"  per Fn_compute_blocks: 1 [{per_fn['1'][0]}, {per_fn['1'][1]}], 2 [" in ran.stdout
    at_six = calibration["at_steps"]["6"]["auto"]["residual_diff_threshold"]
    assert f"  at 6 steps (above: at the model's 12; a step count in between samples in their " \
           f"blend): [{at_six[0]}, {at_six[1]}]; per Fn_compute_blocks: 1 [" in ran.stdout
    checked = optsearch_cmd("check", str(spec))  # says the range before any trial runs
    assert checked.returncode == 0 and "auto range dbcache.residual_diff_threshold: [" in checked.stdout
    assert ' calibrating "auto" ranges: ' in checked.stdout  # in the study's estimate too
    assert f"  per Fn_compute_blocks: 1 [{per_fn['1'][0]}, {per_fn['1'][1]}], 2 [" in checked.stdout
    assert f"  at 6 steps (above: at the model's 12; a step count in between samples in their " \
           f"blend): [{at_six[0]}, {at_six[1]}]" in checked.stdout
    with pytest.raises(SpecError, match='"auto" is for thresholds measured before'):
        spec_from_dict({**_flux_dict([["dbcache"]]), "space": {"dbcache": {"Fn_compute_blocks": "auto"}}})


@pytest.mark.parametrize("model_id, family, param", [
    ("builtin:tiny-flux", "dbcache", "residual_diff_threshold"),
    ("builtin:tiny-sd3", "dbcache", "residual_diff_threshold"),
    ("builtin:tiny-flux", "fbcache", "threshold"),
])
def test_no_threshold_in_an_auto_range_skips_nothing_on_the_first_batch(flux_pipe, model_id, family,
                                                                         param):
    """The brief's "no trial is inert": the range is calibrated on the search's first batch (its
    batch size, prompts and noise) and, for DBCache, past the longest warm-up the spec searches
    and for each Fn searched. Just above its low end a trial skips a step of that batch at the
    longest and the shortest warm-up, at every Fn. Calibrated on the first prompt alone, over
    every step, at Fn = 1, the low end of tiny FLUX sat under the first batch's differences past
    a 4-step warm-up: such trials computed it all; on tiny SD3 the Fn = 3 differences all lie
    above 0.390 (Fn = 1's from 0.335: a Fn = 3 trial under 0.390 computed it all)."""
    from optsearch.measure.evaluate import evaluator_from_spec

    space = {"dbcache": {param: "auto", "Fn_compute_blocks": [1, 3], "Bn_compute_blocks": 0,
                         "max_warmup_steps": [1, 4]},
             "fbcache": {param: "auto"}}[family]
    data = tomllib.loads(FLUX_SPEC)
    data["model"]["id"] = model_id
    spec = spec_from_dict({**data, "search": {"accelerators": [[family]]}, "space": {family: space}})
    pipe = flux_pipe if model_id == "builtin:tiny-flux" else load_pipeline(model_id, "cpu", "float32")
    evaluator = evaluator_from_spec(spec, pipe=pipe)
    calibrated = evaluator.auto_ranges(spec)[f"{family}.{param}"]
    drawn = [{"max_warmup_steps": w, "Fn_compute_blocks": fn} for w in (4, 1) for fn in (1, 2, 3)] \
        if family == "dbcache" else [{}]
    first_batch = evaluator.prompts[:evaluator.config.batch_size]
    assert len(first_batch) == 2
    for values in drawn:
        low, high = calibrated.for_setting(values)
        assert low < high
        setting = {family: {**space, param: low * (1 + 1e-4), **values}}
        with AppliedSetting(pipe, setting) as applied:
            list(generate(pipe, first_batch, evaluator.config, setting=applied, warmup=False))
            assert applied.computed_fraction() < 1.0, (values, low)


@pytest.mark.parametrize("model_id", ["builtin:tiny-flux", "builtin:tiny-sd3"])
def test_a_trial_with_fewer_steps_draws_its_threshold_in_a_range_measured_at_fewer_steps(
        flux_pipe, model_id):
    """steps + dbcache: fewer steps move the latents further per step, so DBCache compares larger
    differences. Calibrated at the model's 12 steps only, a threshold just above that range's
    low end skipped nothing at 6 steps for some Fn (the trial measured nothing). The range is now
    also calibrated at the fewest steps searched, and a trial samples at its own step count:
    just above that low end, every Fn at either warm-up skips a step of the first batch."""
    from optsearch.measure.evaluate import evaluator_from_spec

    space = {"residual_diff_threshold": "auto", "Fn_compute_blocks": [1, 3], "Bn_compute_blocks": 0,
             "max_warmup_steps": [1, 2]}
    data = tomllib.loads(FLUX_SPEC)
    data["model"]["id"] = model_id
    spec = spec_from_dict({**data, "search": {"accelerators": [["steps", "dbcache"]]},
                           "space": {"dbcache": space, "steps": {"num_inference_steps": [6, 12]}}})
    assert [condition.step_counts for condition in spec.calibration_conditions("dbcache")] == [[12, 6]]
    pipe = flux_pipe if model_id == "builtin:tiny-flux" else load_pipeline(model_id, "cpu", "float32")
    evaluator = evaluator_from_spec(spec, pipe=pipe)
    # what the worker's estimate adds first: 3 Fn x (a call of 12 steps + one of 6) x 2 images
    assert evaluator.calibration_images(spec) == pytest.approx(2 * 3 * 1.5)
    calibrated = evaluator.auto_ranges(spec)["dbcache.residual_diff_threshold"]
    assert evaluator.calibration_images(spec) == 0  # measured: a worker here would not again
    assert sorted(calibrated.at_steps) == [6, 12]
    first_batch = evaluator.prompts[:evaluator.config.batch_size]
    six_steps = dataclasses.replace(evaluator.config, steps=6)

    def computed(values: dict, threshold: float) -> float:
        setting = {"dbcache": {**space, **values, "residual_diff_threshold": threshold * (1 + 1e-4)}}
        with AppliedSetting(pipe, setting) as applied:
            list(generate(pipe, first_batch, six_steps, setting=applied, warmup=False))
            return applied.computed_fraction()

    drawn = [{"max_warmup_steps": w, "Fn_compute_blocks": fn} for w in (2, 1) for fn in (1, 2, 3)]
    for values in drawn:
        assert computed(values, calibrated.for_setting(values, steps=6)[0]) < 1.0, values
    assert any(computed(values, calibrated.for_setting(values)[0]) == 1.0 for values in drawn)


def test_a_calibrated_range_between_two_step_counts_is_their_blend():
    by = ("Fn_compute_blocks", {"1": [0.3, 0.5], "2": [0.2, 0.4]})
    at_twelve = CalibratedRange([0.2, 0.5], by)
    at_six = CalibratedRange([0.4, 0.8], ("Fn_compute_blocks", {"1": [0.4, 0.8], "2": [0.5, 0.6]}))
    calibrated = CalibratedRange([0.2, 0.5], by, {12: at_twelve, 6: at_six})
    assert calibrated.for_setting({"Fn_compute_blocks": 1}) == [0.3, 0.5]  # the model's steps
    assert calibrated.for_setting({"Fn_compute_blocks": 1}, steps=12) == [0.3, 0.5]
    assert calibrated.for_setting({"Fn_compute_blocks": 2}, steps=6) == [0.5, 0.6]
    assert calibrated.for_setting({"Fn_compute_blocks": 1}, steps=9) == pytest.approx([0.35, 0.65])
    assert calibrated.for_setting({"Fn_compute_blocks": 2}, steps=4) == [0.5, 0.6]  # the nearest
    stored = {"auto": {"t": [0.2, 0.5]}, "at_steps": {"12": {"auto": {"t": [0.2, 0.5]}},
                                                      "6": {"auto": {"t": [0.4, 0.8]}}}}
    blended = CalibratedRange.stored(stored, "t").for_setting({}, steps=8)
    assert blended == pytest.approx([1 / 3, 0.7], abs=1e-4)


def test_a_published_threshold_outside_the_calibrated_range_is_sampled_within_it(tmp_path):
    """The published warm start enqueues FirstBlockCache's FLUX threshold, 0.12; on tiny FLUX's
    random weights every change lies near 0.3-0.6, so 0.12 would skip nothing. The worker samples
    the threshold within the calibrated range instead (no Optuna out-of-range warning), records
    the released value, and keeps the sampled one as the trial's enqueued value (a re-queued
    trial measures the same point)."""
    text = DBCACHE_SPEC.replace('accelerators = [["dbcache"]]', 'accelerators = [["fbcache"]]') \
        .replace("n_trials = 2\nwarm_start = []", "n_trials = 1\nwarm_start = [\"published\"]") \
        + '[space.fbcache]\nthreshold = "auto"\n'
    spec = write_spec(tmp_path / "published.toml", text)
    url = f"sqlite:///{tmp_path}/published.db"
    ran = optsearch_cmd("run", str(spec), "--storage", url, "--quiet", "-v",
                        "--artifact-dir", str(tmp_path / "art"))
    assert ran.returncode == 0, ran.stderr
    assert "out of range" not in ran.stderr
    study = optuna.load_study(study_name="flux", storage=url)
    [calibration] = [v for k, v in study.user_attrs.items()
                     if k.startswith("optsearch:calibration:") and k.endswith(":fbcache")]
    low, high = calibration["auto"]["threshold"]
    assert 0.12 < low
    [trial] = study.get_trials()
    assert trial.user_attrs["outside_calibrated_range"] == {"fbcache.threshold": 0.12}
    threshold = trial.params["fbcache.threshold"]
    assert low <= threshold <= high and trial.user_attrs["setting"]["fbcache"]["threshold"] == threshold
    assert trial.system_attrs["fixed_params"] == {"fbcache.threshold": threshold}
    assert "(enqueued) lies outside the range calibrated on this device" in ran.stderr
    checked = optsearch_cmd("check", str(spec))  # says so before a study runs
    assert checked.returncode == 0
    assert "warm start: the published fbcache.threshold = 0.12 lies outside that range" in checked.stdout


@pytest.mark.parametrize("model_id", ["builtin:tiny-sd3", "builtin:tiny-qwen-image"])
def test_dbcache_runs_on_the_builtin_sd3_and_qwen_image_and_restores_exactly(model_id):
    """The real diffusers pipeline classes, tiny and offline: calibration finds the residual
    differences, a threshold above them skips blocks (cache-dit reports how many), changes the
    images, and leaves the pipeline exactly as it was."""
    pipe = load_pipeline(model_id, device="cpu", dtype="float32")
    assert pipeline_kind(pipe) == "transformer" and model_kind(model_id) == "transformer"
    baseline = generate_images(pipe, PROMPTS, steps=8)
    measured = dbcache.calibrate(pipe, lambda: generate_images(pipe, PROMPTS, steps=8))
    low, high = measured["auto"]["residual_diff_threshold"]  # skips nothing .. nearly everything
    assert 0 < low < high
    setting = {"dbcache": {"residual_diff_threshold": high * 1.01, "max_warmup_steps": 2}}
    with AppliedSetting(pipe, setting) as applied:
        cached = generate_images(applied, PROMPTS, steps=8)
        assert 0.0 < applied.computed_fraction() < 1.0
    assert np.abs(cached - baseline).max() > 1e-4
    np.testing.assert_array_equal(generate_images(pipe, PROMPTS, steps=8), baseline)


def test_a_diffusers_cache_on_sd3_says_its_transformer_has_no_hooks():
    """SD3's transformer has no diffusers enable_cache: fbcache is refused at load, dbcache is not."""
    from optsearch.measure.models import ModelLoadError
    from optsearch.measure.served import check_families

    pipe = load_pipeline("builtin:tiny-sd3", device="cpu", dtype="float32")
    check_families(pipe, spec_from_dict({"model": {"id": "builtin:tiny-sd3"},
                                         "search": {"accelerators": [["steps"], ["dbcache"]]}}))
    with pytest.raises(ModelLoadError, match="fbcache needs diffusers' enable_cache"):
        check_families(pipe, spec_from_dict({"model": {"id": "builtin:tiny-sd3"},
                                             "search": {"accelerators": ["fbcache"]}}))


def test_a_cache_is_not_stacked_on_a_transformer_that_has_one(flux_pipe):
    """A diffusers cache the user enabled, or cache-dit applied by optsearch: a second cache is
    refused with one line naming the first, not stacked on it (cache-dit would have run on top
    of FirstBlockCache); once disabled, the setting applies."""
    from diffusers.hooks import FirstBlockCacheConfig

    flux_pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    try:
        with pytest.raises(ValueError, match=r"already has a diffusers cache \(enable_cache\)"):
            optsearch.apply(flux_pipe, {"dbcache": {"residual_diff_threshold": 0.4}})
    finally:
        flux_pipe.transformer.disable_cache()
    with optsearch.apply(flux_pipe, {"dbcache": {"residual_diff_threshold": 0.4}}):
        with pytest.raises(ValueError, match=r"already has cache-dit \(enable_cache\)"):
            optsearch.apply(flux_pipe, {"fbcache": {"threshold": 0.4}})
    with optsearch.apply(flux_pipe, {"fbcache": {"threshold": 0.4}}):
        pass


def test_first_block_cache_calibrates_the_change_it_compares(flux_pipe):
    """fbcache's "auto" range: the relative changes of the first block's residual over one call;
    on other prompts a threshold under the range skips nothing, one over it skips most steps."""
    from optsearch.accelerators import fbcache

    measured = fbcache.calibrate(flux_pipe, lambda: _flux_images(flux_pipe))
    low, high = measured["auto"]["threshold"]
    assert 0 < low < high and measured["observed"]["steps"] == 11  # every step after the first

    def computed(threshold: float) -> float:
        with AppliedSetting(flux_pipe, {"fbcache": {"threshold": threshold}}) as applied:
            generate_images(applied, ["a lighthouse at dusk"], steps=12)
            return applied.computed_fraction()

    assert computed(low * 0.5) == 1.0
    assert computed(high * 1.5) < 0.5


class StudioPipeline:
    """A user's own wrapper around FLUX: no diffusers class, no name cache-dit knows; only its
    transformer's class is one cache-dit knows."""

    def __init__(self, inner):
        self.inner, self.transformer = inner, inner.transformer

    @property
    def device(self):
        return self.inner.device

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_dbcache_applies_through_the_transformer_when_cache_dit_knows_only_that():
    studio = StudioPipeline(load_pipeline("builtin:tiny-flux", device="cpu", dtype="float32"))
    assert dbcache.problem_with(studio) is None

    def images(call):
        return generate_images(call, ["a red cube", "a small boat"], steps=12)

    plain = images(studio)
    with AppliedSetting(studio, {"dbcache": {"residual_diff_threshold": 0.7,
                                             "max_warmup_steps": 2}}) as cached:
        skipped = images(cached)
        fraction = cached.computed_fraction()
    assert not np.array_equal(plain, skipped)  # it cached
    assert fraction is not None and 0.2 < fraction < 1.0  # from the adapter's own statistics
    assert np.array_equal(images(studio), plain)  # and restored bit for bit


def test_qwen_image_generates_without_warnings_and_with_the_pipelines_own_images(caplog):
    """Qwen-Image takes true_cfg_scale (default 4.0) and no guidance_scale: with neither a true
    CFG nor a negative prompt in the spec, optsearch's calls draw no per-call warning and make
    the images diffusers' defaults make (no guidance either way)."""
    import logging

    from optsearch.measure.generation import GenerationConfig, generate

    pipe = load_pipeline("builtin:tiny-qwen-image", device="cpu", dtype="float32")
    config = GenerationConfig(steps=4, batch_size=2, seed=0)
    with caplog.at_level(logging.WARNING):
        [batch] = list(generate(pipe, PROMPTS[:2], config, warmup=False))
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("true_cfg_scale" in m or "guidance_scale" in m for m in said), said
    generators = [torch.Generator().manual_seed(prompt_seed(0, i)) for i in range(2)]
    plain = pipe(PROMPTS[:2], num_inference_steps=4, generator=generators, output_type="np").images
    np.testing.assert_array_equal(batch.images, (plain * 255).round().clip(0, 255).astype(np.uint8))


def test_the_estimate_counts_the_calibration_calls_before_the_first_trial():
    from optsearch.accelerators import calibration_cost
    from optsearch.optimize.estimate import Estimate, estimate_text

    assert calibration_cost("dbcache", {"Fn_compute_blocks": [1, 2, 3, 4]}, [12, 6]) == 6.0
    assert calibration_cost("fbcache", {}, [28]) == 1.0
    calibrating = Estimate(0.5, n_trials=4, num_samples=4, calibration_images=12)
    plain = Estimate(0.5, n_trials=4, num_samples=4)
    assert calibrating.total(1) == tuple(seconds + 6.0 for seconds in plain.total(1))
    assert ', after ~6 s calibrating "auto" ranges: ' in estimate_text(calibrating)
    assert "calibrating" not in estimate_text(plain)
    brief = Estimate(0.5, n_trials=4, num_samples=4, calibration_images=0.5)  # one small call
    assert ', after <1 s calibrating "auto" ranges: ' in estimate_text(brief)
    assert "/ a 1x-2x speedup: " in estimate_text(plain)


def test_the_estimate_counts_each_combos_fewer_steps():
    from optsearch.optimize.estimate import Estimate, expected_speedups
    from optsearch.study_spec import spec_from_dict

    def spec(accelerators, steps=(10, 25)):
        space = {"steps": {"num_inference_steps": list(steps)}} if steps else {}
        return spec_from_dict({"model": {"id": "builtin:tiny", "steps": 50},
                               "search": {"accelerators": accelerators}, "space": space})

    assert expected_speedups(spec(["deepcache"], steps=None)) == (1.0, 2.0)
    assert expected_speedups(spec([["steps"]])) == pytest.approx((2.0, 5.0))  # 50/25, 50/10
    assert expected_speedups(spec([["steps", "deepcache"]])) == pytest.approx((2.0, 10.0))
    # as seconds: a combo at 5x and one at 1x take 0.6 of the baseline's on average, 1/0.6 = 1.67x
    assert expected_speedups(spec([["steps"], ["deepcache"]], steps=(10, 10))) \
        == pytest.approx((2 / 1.2, 2 / 0.7))
    slow, fast = Estimate(1.0, 10, 4, speedups=(2.0, 5.0)).total(1)
    assert (slow, fast) == pytest.approx((4 + 10 * 4 / 2.0 * 1.1, 4 + 10 * 4 / 5.0 * 1.1)[::-1])
