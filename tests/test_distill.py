"""A step-distilled LoRA as a family (`distill`, with `steps`): loaded as an adapter for a
trial, guidance off in its calls unless kept, weighed against and beside the caches, unloaded
bit for bit, and exported as the libraries' own calls."""

from __future__ import annotations

import json
import warnings
from functools import partial

import numpy as np
import optuna
import pytest
import torch

import optsearch
from optsearch.accelerators import apply_setting, denoiser, pipeline_problem
from optsearch.errors import ModelLoadError, SpecError
from optsearch.measure.builtin import build_builtin
from optsearch.measure.generation import GenerationConfig
from optsearch.measure.models import with_lora
from optsearch.measure.prompts import load_prompts
from optsearch.measure.served import pipeline_from_spec
from optsearch.optimize.export import export_study
from optsearch.optimize.space import suggest_setting
from optsearch.optimize.study import load_study
from optsearch.storage.rdb import open_storage
from optsearch.study_spec import load_spec, notes
from tests.conftest import TINY_SPEC, optsearch_cmd, write_spec
from tests.test_deploy_exports import export, exported_function, images, study_with_winner
from tests.test_image_conditioned import first_images, quiet_builtin
from tests.test_lora import lora_parameters, saved_lora

DISTILL_SPEC = TINY_SPEC.replace('accelerators = ["deepcache", "tome"]', 'accelerators = '
                                 '[["steps"], ["distill", "steps"], ["distill", "steps", "deepcache"]]')


def layer_types(pipe) -> list[str]:
    return [type(module).__name__ for module in denoiser(pipe).modules()]


@pytest.mark.parametrize("model_id, guidance, fraction", [
    ("builtin:tiny", {"guidance_scale": 7.5}, 0.5),  # SD: CFG in one batched UNet call, off
    ("builtin:tiny-qwen-image", {"true_cfg_scale": 4.0, "negative_prompt": " "}, 0.5),  # true CFG
    ("builtin:tiny-flux", {"guidance_scale": 3.5}, 1.0),  # FLUX.1-dev: embedded guidance stays
    ("builtin:tiny-sd3", {"guidance_scale": 7.0}, 0.5),  # no enable_cache: distill applies still
], ids=["sd", "qwen-image", "flux", "sd3"])
def test_a_distilled_lora_runs_without_guidance_and_unloads_bit_for_bit(tmp_path, model_id,
                                                                        guidance, fraction):
    lora = saved_lora(model_id, tmp_path / "lightning", seed=1)
    pipe = quiet_builtin(model_id)
    config = GenerationConfig(steps=8, batch_size=2, **{k: v for k, v in guidance.items()
                                                        if k != "guidance_scale"},
                              guidance_scale=guidance.get("guidance_scale", 1.0))
    images_of = partial(first_images, pipe, config, load_prompts("builtin", 2))
    baseline, layers = images_of(), layer_types(pipe)
    few = {"steps": {"num_inference_steps": 4}}
    for cfg, share, told in ((False, fraction, fraction < 1), (True, 1.0, False)):
        applied = apply_setting(pipe, {"distill": {"lora": str(lora), "cfg": cfg}, **few})
        try:
            assert lora_parameters(pipe) > 0
            distilled = images_of(applied)
            assert applied.computed_fraction() == pytest.approx(0.5 * share)  # 4 of 8 steps
            assert bool(applied.ran_with()) == told  # the guidance it turned off, for the export
        finally:
            applied.restore()
        assert lora_parameters(pipe) == 0 and layer_types(pipe) == layers  # peft's wrappers gone
        np.testing.assert_array_equal(images_of(), baseline)
        steps_alone = apply_setting(pipe, few)
        try:
            assert not np.array_equal(distilled, images_of(steps_alone))  # the LoRA counts
        finally:
            steps_alone.restore()
    if fraction < 1:
        applied = apply_setting(pipe, {"distill": {"lora": str(lora)}, **few})
        try:
            kwargs = dict(guidance, num_inference_steps=8)
            applied._patches[0].prepare(kwargs)
            assert "negative_prompt" not in kwargs and 1.0 in kwargs.values()
        finally:
            applied.restore()


def test_distill_beside_a_cache_and_a_served_lora(tmp_path):
    lora = saved_lora("builtin:tiny", tmp_path / "lightning", seed=1)
    pipe = quiet_builtin("builtin:tiny")
    config = GenerationConfig(steps=8, batch_size=2)
    images_of = partial(first_images, pipe, config, load_prompts("builtin", 2))
    baseline = images_of()
    setting = {"distill": {"lora": str(lora)}, "steps": {"num_inference_steps": 6},
               "deepcache": {"cache_interval": 2, "cache_branch_id": 0}}
    applied = apply_setting(pipe, setting)
    try:
        combined = images_of(applied)
        assert applied.computed_fraction() < 0.5 * 6 / 8  # DeepCache skips on the distilled UNet
    finally:
        applied.restore()
    np.testing.assert_array_equal(images_of(), baseline)
    assert not np.array_equal(combined, baseline)

    style = saved_lora("builtin:tiny", tmp_path / "style", seed=2)
    served = with_lora(quiet_builtin("builtin:tiny"), [(str(style), 0.8)])
    assert "fuse them (model.fuse_lora = true)" in pipeline_problem(["distill"], served)
    fused = with_lora(quiet_builtin("builtin:tiny"), [(str(style), 0.8)], fuse=True)
    assert pipeline_problem(["distill", "steps"], fused) is None
    applied = apply_setting(fused, {"distill": {"lora": str(lora)}, "steps": {"num_inference_steps": 4}})
    applied.restore()
    assert lora_parameters(fused) == 0

    other = saved_lora("builtin:tiny-flux", tmp_path / "flux-lora")  # a LoRA for another model
    with pytest.raises(ModelLoadError, match="adapts no layer of .*a LoRA for another model"):
        apply_setting(pipe, {"distill": {"lora": str(other)}, "steps": {"num_inference_steps": 4}})
    assert lora_parameters(pipe) == 0
    np.testing.assert_array_equal(images_of(), baseline)
    text = DISTILL_SPEC + f'[space.distill]\nlora = "{other}"\n'
    spec = load_spec(write_spec(tmp_path / "other.toml", text))
    with pytest.raises(ModelLoadError, match="adapts no layer"):  # before the baseline is timed
        pipeline_from_spec(spec)


@pytest.mark.parametrize("lines, key, says", [
    ("", "space.distill.lora", "is required with distill"),
    ('[space.distill]\nlora = ["a", "a"]\n', "space.distill.lora", "names one twice"),
    ('[space.distill]\nlora = 3\n', "space.distill.lora", "must be a string, or a list of them"),
    ('[space.distill]\nlora = "a/b"\n', "search.accelerators", "distill runs with steps"),
    ('[space.distill]\nlora = "a/b"\n', "search.accelerators", "tgate caches the guided half"),
    ('[space.distill]\nlora = "a/b"\n', "model.compile", "set space.distill.fuse = true"),
    ('[space.distill]\nlora = "a/b"\nscheduler_config = "lightning.json"\n',
     "space.distill.scheduler_config", "No such file"),
    ('[space.distill]\nlora = "./lightning"\n', "space.distill.lora", "no such file or folder"),
], ids=["no-lora", "a-lora-twice", "a-number", "no-steps", "tgate", "compiled", "no-scheduler-file",
        "no-lora-folder"])
def test_a_distill_spec_error_is_one_line(tmp_path, lines, key, says):
    text = DISTILL_SPEC + lines
    if "without steps" in says or "distill runs with steps" in says:
        text = text.replace('["distill", "steps"], ', '["distill"], ')
    if "tgate" in says:
        text = text.replace('["steps"], ', '["distill", "steps", "tgate"], ')
    if key == "model.compile":
        text = text.replace("steps = 8\n", 'steps = 8\ncompile = "regional"\n')
    with pytest.raises(SpecError) as error:
        load_spec(write_spec(tmp_path / "s.toml", text))
    assert f"{key}: " in str(error.value) and says in str(error.value)


def test_a_distill_study_runs_from_the_command_line_and_its_winner_exports(tmp_path):
    lora = saved_lora("builtin:tiny", tmp_path / "lightning", seed=1)
    text = DISTILL_SPEC + '[space.steps]\nnum_inference_steps = [3, 6]\n' \
        + '[space.distill]\nlora = "./lightning"\nnum_inference_steps = [1, 2]\n'  # beside the spec
    spec = write_spec(tmp_path / "distill.toml", text.replace("n_trials = 4", "n_trials = 5"))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = optsearch_cmd("run", str(spec), "--storage", url, cwd=tmp_path.parent)
    assert result.returncode == 0, result.stderr
    assert "distill's LoRA is measured as an adapter" in result.stdout + result.stderr
    assert "No LoRA keys associated" not in result.stderr  # diffusers' "safe to ignore", each trial
    assert f"distill(lora={lora}" in result.stdout  # read from the spec's folder
    # the estimate counts each combo's steps: steps at 8/6-8/3, the LoRA at 8/2-8/1 with guidance
    # off (1x-2x), averaged as seconds over the three combos
    assert "/ a 2.4x-6x speedup (the combos' fewer steps counted)" in result.stdout
    import optuna

    trials = optuna.load_study(study_name="tiny", storage=url).trials
    distilled = [t for t in trials if "distill" in t.user_attrs.get("combo", "")]
    assert distilled and all(t.user_attrs["setting"]["distill"]["lora"] == str(lora) for t in distilled)
    assert all(t.user_attrs["setting"]["steps"]["num_inference_steps"] in (1, 2) for t in distilled)
    result = optsearch_cmd("evaluate", str(spec), "--set", "distill.cfg=true", "--json", "-q")
    assert result.returncode == 0, result.stderr  # the spec's LoRA, with what --set changes
    measured = json.loads(result.stdout)["setting"]
    assert measured["distill"]["lora"] == str(lora) and measured["distill"]["cfg"] is True
    assert measured["steps"]["num_inference_steps"] == 2  # the most the LoRA's own range draws

    # its winner, exported: the LoRA, its recipe's scheduler (SDXL-Lightning's: Euler, trailing
    # timesteps) and the guidance off, with the libraries' own calls
    recipe = {"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing"}
    (tmp_path / "lightning.json").write_text(json.dumps(recipe))
    spec = load_spec(write_spec(tmp_path / "recipe.toml", text + 'scheduler_config = "lightning.json"\n'))
    inlined = spec.space["distill"]["scheduler_config"]  # the stored spec holds the object
    assert json.loads(inlined) == recipe
    setting = {"distill": {"lora": str(lora / "pytorch_lora_weights.safetensors"), "weight_name": "",
                           "lora_scale": 0.9, "cfg": False, "scheduler_config": inlined},
               "steps": {"num_inference_steps": 4},
               "deepcache": {"cache_interval": 2, "cache_branch_id": 0}}
    (tmp_path / "export").mkdir()
    url = study_with_winner(tmp_path / "export", text.replace("./", "../"), setting, calibration_used={
        "distill": {"call": {"guidance_scale": 1.0}, "scheduler": recipe}})
    code = export(tmp_path / "export", url, "tiny", "diffusers", "accelerate_pipe.py")
    assert "call_kwargs.update({'guidance_scale': 1.0})" in code and "adapter_name='distill'" in code
    accelerate = exported_function(code)
    pipe = build_builtin("builtin:tiny")
    plain_scheduler = pipe.scheduler
    with optsearch.apply(pipe, setting) as run:
        expected = images(run, 8, kind="sd", guidance_scale=7.5)
        assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
        assert pipe.scheduler.config.timestep_spacing == "trailing"  # a default in the model's config
    assert pipe.scheduler is plain_scheduler  # the model's scheduler back
    pipe = build_builtin("builtin:tiny")
    np.testing.assert_array_equal(images(pipe, kind="sd", **accelerate(pipe)), expected)
    exported = export_study(*load_study(open_storage(url, heartbeat_interval=None), "tiny"))
    with warnings.catch_warnings():  # guidance off is the setting's own, not another context
        warnings.simplefilter("error", UserWarning)
        with optsearch.apply(build_builtin("builtin:tiny"), exported) as run:
            images(run, 8, kind="sd", guidance_scale=1.0)
    fused = {**setting, "distill": {**setting["distill"], "fuse": True}}  # as most servers run it
    (tmp_path / "fused").mkdir()
    url = study_with_winner(tmp_path / "fused", text.replace("./", "../"), fused, calibration_used={
        "distill": {"call": {"guidance_scale": 1.0}, "scheduler": recipe}})
    code = export(tmp_path / "fused", url, "tiny", "diffusers", "accelerate_pipe.py")
    assert "pipe.fuse_lora(adapter_names=['distill'], lora_scale=1.0)" in code
    with optsearch.apply(build_builtin("builtin:tiny"), fused) as run:
        fused_images = images(run, 8, kind="sd", guidance_scale=7.5)
    pipe = build_builtin("builtin:tiny")
    np.testing.assert_array_equal(images(pipe, kind="sd", **exported_function(code)(pipe)), fused_images)
    setting["distill"]["scheduler_config"] = ""  # the recipe's scheduler counts
    with optsearch.apply(build_builtin("builtin:tiny"), setting) as run:
        assert not np.array_equal(images(run, 8, kind="sd", guidance_scale=7.5), expected)


def test_the_lora_draws_its_own_steps_and_steps_alone_keeps_the_fewer_steps_range(tmp_path):
    """Lightning at 4-8 steps and the fewer-steps line at 20-40 in one study: a combo with
    distill draws `[space.distill] num_inference_steps` (its own Optuna parameter, so TPE never
    mixes the two ranges), steps alone draws space.steps'; the space's size, the grid, the
    calibration's fewest steps and the checks count each combo's own range."""
    text = DISTILL_SPEC.replace("steps = 8", "steps = 16") + (
        '[space.steps]\nnum_inference_steps = [8, 12]\n'
        '[space.distill]\nlora = "a/b"\nnum_inference_steps = [2, 4]\n'
        '[space.deepcache]\ncache_interval = [2, 3]\ncache_branch_id = 0\n')
    spec = load_spec(write_spec(tmp_path / "own.toml", text))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = {}
    for _ in range(40):
        trial = study.ask()
        setting = suggest_setting(trial, spec)
        drawn.setdefault(tuple(setting), set()).add(setting["steps"]["num_inference_steps"])
        named = "distill.num_inference_steps" if "distill" in setting else "steps.num_inference_steps"
        assert set(trial.params) - {"combo", "deepcache.cache_interval"} == {named}
        study.tell(trial, 1.0)
    assert drawn == {("steps",): set(range(8, 13)), ("distill", "steps"): {2, 3, 4},
                     ("distill", "steps", "deepcache"): {2, 3, 4}}
    assert spec.space_size() == 5 + 3 + 3 * 2
    assert "distill runs at its own steps: the LoRA at 2-4; steps alone (the fewer-steps line) " \
        "at 8-12" in notes(spec)  # what check, run and study create print
    assert spec.fewest_steps() == 2  # a cache beside the LoRA calibrates on it at 2-4 steps:
    assert [condition.step_counts for condition in spec.calibration_conditions("deepcache")] \
        == [[4, 2]]
    one = load_spec(write_spec(tmp_path / "grid.toml", text.replace(
        'accelerators = [["steps"], ["distill", "steps"], ["distill", "steps", "deepcache"]]',
        'accelerators = ["distill", "steps"]\nsampler = "grid"').split("[space.deepcache]")[0]))
    from optsearch.optimize.samplers import make_sampler

    assert make_sampler(one)._search_space == {"distill.num_inference_steps": [2, 3, 4]}
    with pytest.raises(SpecError, match=r"space.distill.num_inference_steps: \[2, 20\] goes past "
                                        r"model.steps=16"):
        load_spec(write_spec(tmp_path / "past.toml", text.replace("[2, 4]", "[2, 20]")))
    with pytest.raises(SpecError, match="space.distill.num_inference_steps: 0 must be >= 1"):
        load_spec(write_spec(tmp_path / "zero.toml", text.replace("[2, 4]", "[0, 4]")))


RECIPES = """[space.distill]
lora = "LORA"
[[space.distill.recipes]]
weight_name = "lightning-4steps.safetensors"
num_inference_steps = 2
[[space.distill.recipes]]
name = "eight"
lora = "LORA_2"
num_inference_steps = 4
scheduler_config = '{"timestep_spacing": "trailing"}'
"""


def test_a_recipe_is_drawn_whole_its_file_with_its_steps_and_scheduler(tmp_path):
    """Qwen-Image-Lightning's 4-step file runs at 4 steps, its 8-step file at 8: recipes
    (`[[space.distill.recipes]]`) are drawn whole by name ("distill.recipe"), so no trial runs
    a file at the other's steps; worker start loads each recipe's LoRA, so one that cannot load
    ends there; each recipe's keys are checked, one line each."""
    four, eight = (saved_lora("builtin:tiny", tmp_path / name, seed=seed)
                   for name, seed in (("four", 1), ("eight", 2)))
    (four / "pytorch_lora_weights.safetensors").rename(four / "lightning-4steps.safetensors")
    text = DISTILL_SPEC + "[space.steps]\nnum_inference_steps = [5, 8]\n" \
        + RECIPES.replace("LORA_2", str(eight)).replace("LORA", str(four))
    spec = load_spec(write_spec(tmp_path / "recipes.toml", text))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = set()
    for _ in range(40):
        trial = study.ask()
        setting = suggest_setting(trial, spec)
        study.tell(trial, 1.0)
        if "distill" not in setting:
            assert 5 <= setting["steps"]["num_inference_steps"] <= 8
            continue
        assert set(trial.params) - {"combo", "deepcache.cache_interval", "deepcache.cache_branch_id"} \
            == {"distill.recipe"}  # the steps come with the recipe: not drawn apart
        distilled = setting["distill"]
        drawn.add((trial.params["distill.recipe"], distilled["lora"], distilled["weight_name"],
                   setting["steps"]["num_inference_steps"], distilled["scheduler_config"]))
    drawn_names = {drawn_one[0] for drawn_one in drawn}
    assert drawn == {("lightning-4steps", str(four), "lightning-4steps.safetensors", 2, ""),
                     ("eight", str(eight), "", 4, '{"timestep_spacing": "trailing"}')}
    assert [s["distill"]["lora"] for s in spec.distill_settings()] == [str(four), str(eight)]
    assert spec.fewest_steps("deepcache") == 2 and spec.step_counts(("distill", "steps")) == {2, 4}
    assert "distill runs at its own steps: lightning-4steps at 2, eight at 4; steps alone (the " \
        "fewer-steps line) at 5-8" in notes(spec)
    # a log line names what tells the recipes apart, not each recipe's whole scheduler JSON
    assert spec.searched_params("distill", ("distill", "steps")) == ["lora", "weight_name",
                                                                      "scheduler_config"]
    assert spec.space_size() == 4 + 2 + 2 * len(spec.grid_values("deepcache", "cache_interval")) \
        * len(spec.grid_values("deepcache", "cache_branch_id"))
    # which recipe wins is what a user asks: each has its own row (and confirmation target)
    from optsearch.optimize.objectives import best_per_combo
    from optsearch.storage.record import trial_metrics

    recorded = optuna.create_study(direction="maximize")
    for recipe, speedup in (("eight", 3.0), ("lightning-4steps", 5.0), ("eight", 4.0), (None, 2.0)):
        params = {"distill.recipe": recipe} if recipe else {}
        recorded.add_trial(optuna.trial.create_trial(
            value=speedup, params=params, distributions={name: optuna.distributions.
                                                         CategoricalDistribution(list(drawn_names))
                                                         for name in params},
            user_attrs={"combo": "distill+steps" if recipe else "steps", "speedup": speedup,
                        "speedup_low": speedup - 0.5, "speedup_high": speedup + 0.5,
                        "psnr": 35.0, "psnr_low": 34.0, "psnr_high": 36.0,
                        "setting": {"steps": {"num_inference_steps": 4}},
                        "constraints": {"quality": -1.0}}))
    best = {label: trial.number for label, trial in best_per_combo(recorded, spec).items()}
    assert best == {"distill+steps [eight]": 2, "distill+steps [lightning-4steps]": 1, "steps": 3}
    assert trial_metrics(recorded.trials[2])["combo"] == "distill+steps [eight]"
    from optsearch.cli.plots import speedup_vs_quality

    legend = speedup_vs_quality(recorded, spec).axes[0].get_legend_handles_labels()[1]
    assert {"distill+steps [eight] (feasible)", "distill+steps [lightning-4steps] (feasible)",
            "steps (feasible)"} <= set(legend)  # each recipe its own colour
    import contextlib
    import io

    from optsearch.cli.commands import _print_confirmations
    from optsearch.cli.show import _confirmations_table
    from optsearch.optimize.confirm_targets import ConfirmTargets

    confirmed = {"trial": 2, "combo": "distill+steps", "speedup": 3.5, "speedup_low": 3.0,
                 "speedup_high": 4.0, "psnr": {"mean": 35.0, "low": 34.0, "high": 36.0},
                 "num_samples": 4, "repeats": 3, "feasible": True, "device": "cpu:x86_64",
                 "fingerprint": "f", "setting": {}}
    table = _confirmations_table([{**confirmed, "search": trial_metrics(recorded.trials[2])}], "psnr")
    assert "distill+steps [eight]" in table  # the confirmations say which recipe too
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _print_confirmations([confirmed], ConfirmTargets(None, recorded, spec, [recorded.trials[2]], []))
    assert "distill+steps [eight]" in printed.getvalue()
    pipe = pipeline_from_spec(spec)  # both files load: the baseline may be timed
    assert lora_parameters(pipe) == 0
    recipes_spec = tmp_path / "recipes.toml"
    result = optsearch_cmd("evaluate", str(recipes_spec), "--set", "distill.recipe=eight", "--json", "-q")
    assert result.returncode == 0, result.stderr  # that recipe, whole: its file, steps, scheduler
    measured = json.loads(result.stdout)["setting"]
    assert measured["distill"]["lora"] == str(eight) and measured["steps"]["num_inference_steps"] == 4
    assert measured["distill"]["scheduler_config"] == '{"timestep_spacing": "trailing"}'
    result = optsearch_cmd("evaluate", str(recipes_spec), "--set", "distill.recipe=nine")
    assert result.returncode == 2 and "no such recipe (its recipes: lightning-4steps, eight)" in \
        result.stderr and "Traceback" not in result.stderr

    other = saved_lora("builtin:tiny-flux", tmp_path / "flux-lora")  # the second recipe's fails
    bad = load_spec(write_spec(tmp_path / "bad.toml", text.replace(str(eight), str(other))))
    with pytest.raises(ModelLoadError, match="adapts no layer"):
        pipeline_from_spec(bad)
    for change, key, says in (
            (("num_inference_steps = 4", "num_inference_steps = [2, 4]"),
             "space.distill.recipes[2].num_inference_steps", "takes one value"),
            (('name = "eight"', 'name = "lightning-4steps"'), "space.distill.recipes",
             "each recipe needs its own name"),
            (("num_inference_steps = 4", "num_inference_steps = 9"),
             "space.distill.recipes[2].num_inference_steps", "[9] goes past model.steps=8"),
            (('name = "eight"', 'shift = 3.0'), "space.distill.recipes[2].shift", "unknown key"),
            (("scheduler_config = '{", "scheduler_config = '{{"), "space.distill.recipes[2]"
             ".scheduler_config", "not JSON")):
        with pytest.raises(SpecError) as error:
            load_spec(write_spec(tmp_path / "wrong.toml", text.replace(*change)))
        assert f"{key}: " in str(error.value) and says in str(error.value)
    # on the grid, each recipe is a grid of its own: every setting of the space once, each file
    # at its own steps, then the study stops
    from optsearch.optimize.samplers import make_sampler

    gridded = load_spec(write_spec(tmp_path / "grid.toml",
                                   text.replace("n_trials = 4", 'n_trials = 100\nsampler = "grid"')))
    study = optuna.create_study(sampler=make_sampler(gridded))
    settings = []
    study.optimize(lambda trial: settings.append(suggest_setting(trial, gridded)) or 1.0, n_trials=100)
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == len(settings) \
        == gridded.space_size() == spec.space_size()  # (fit to 2 or 4 steps, some run alike)
    assert {(s["distill"]["lora"], s["steps"]["num_inference_steps"]) for s in settings
            if "distill" in s} == {(str(four), 2), (str(eight), 4)}
    assert {s["steps"]["num_inference_steps"] for s in settings if "distill" not in s} == {5, 6, 7, 8}


def test_an_auto_threshold_is_calibrated_on_each_model_its_trials_run(tmp_path):
    """A cache searched alone and beside step-distilled LoRAs calibrates its "auto" range on the
    plain model and on each LoRA's distilled model, at the steps each runs, and a trial samples
    the range of the model it runs: a range measured on the plain model can skip nothing, or
    everything, on Lightning at 4 steps (it did, here: below)."""
    from optsearch.measure.evaluate import evaluator_from_spec
    from tests.test_families import FLUX_SPEC

    one, two = (saved_lora("builtin:tiny-flux", tmp_path / name, seed=seed)
                for name, seed in (("one", 1), ("two", 2)))
    searched = FLUX_SPEC.replace('[["steps"], ["magcache"], ["steps", "taylorseer"]]', "COMBOS") \
        + "[space.steps]\nnum_inference_steps = [6, 10]\n" \
        + f'[space.distill]\nlora = ["{one}", "{two}"]\nnum_inference_steps = [3, 4]\n'
    pipe, prompts = build_builtin("builtin:tiny-flux"), load_prompts("builtin", 4)
    ranges, calibrations = {}, {}
    for name, combos in (("plain", '[["steps", "fbcache"]]'),
                         ("one", '[["distill", "steps", "fbcache"]]'),
                         ("mixed", '[["steps", "fbcache"], ["distill", "steps", "fbcache"]]')):
        text = searched.replace("COMBOS", combos)
        if name == "plain":  # no LoRA searched
            text = text.split("[space.distill]")[0]
        spec = load_spec(write_spec(tmp_path / f"{name}.toml", text if name != "one" else
                                    text.replace(f'["{one}", "{two}"]', f'"{one}"')))
        evaluator = evaluator_from_spec(spec, pipe=pipe, prompts=prompts)
        ranges[name] = evaluator.auto_ranges(spec)["fbcache.threshold"]
        calibrations[name] = evaluator.calibration["fbcache"]
        assert lora_parameters(pipe) == 0  # each LoRA unloaded after calibrating
    mixed = ranges["mixed"]
    assert [(condition.lora, condition.step_counts) for condition in
            spec.calibration_conditions("fbcache")] == [(None, [12, 6]), (str(one), [4, 3]),
                                                         (str(two), [4, 3])]
    assert "fbcache's \"auto\" range is calibrated on the plain model and each of 2 " \
        "step-distilled LoRAs" in " ".join(notes(spec))
    # the plain model's as the plain spec measures it; each LoRA's as a spec of that LoRA alone
    assert list(mixed) == list(ranges["plain"]) and mixed.at_steps == ranges["plain"].at_steps
    assert set(mixed.under) == {str(one), str(two)}
    assert mixed.under[str(one)] == list(ranges["one"]) and mixed.under[str(one)] != mixed.under[str(two)]
    for steps in (3, 4):
        distilled = mixed.for_setting({}, steps, str(one))
        assert distilled == ranges["one"].for_setting({}, steps) != mixed.for_setting({}, steps)
    # each trial samples in its own model's range
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    outside_plain = 0
    for _ in range(30):
        trial = study.ask()
        setting = suggest_setting(trial, spec, {"fbcache.threshold": mixed})
        study.tell(trial, 1.0)
        steps, lora = setting["steps"]["num_inference_steps"], setting.get("distill", {}).get("lora")
        low, high = mixed.for_setting({}, steps, lora)
        assert low <= setting["fbcache"]["threshold"] <= high
        plain_low, plain_high = mixed.for_setting({}, steps)
        outside_plain += lora is not None and not plain_low <= setting["fbcache"]["threshold"] <= plain_high
    assert outside_plain > 0  # a distilled trial drew what the plain range would not hold
    # a calibration stored before (the plain model's alone) measures only the LoRAs it lacks
    evaluator = evaluator_from_spec(spec, pipe=pipe, prompts=prompts)
    evaluator.calibration["fbcache"] = calibrations["plain"]
    loras = spec.calibration_conditions("fbcache")[1:]  # and the estimate counts those alone
    assert evaluator.calibration_images(spec) == evaluator.config.batch_size * spec.calibration_calls(
        {"fbcache": loras}) < evaluator.config.batch_size * spec.calibration_calls()
    evaluator.auto_ranges(spec)
    assert evaluator.calibration["fbcache"]["auto"] == calibrations["plain"]["auto"]
    assert evaluator.calibration["fbcache"]["under"] == calibrations["mixed"]["under"]


def test_wan22s_two_experts_each_take_their_own_distilled_lora(tmp_path):
    high = saved_lora("builtin:tiny-wan22", tmp_path / "high", seed=1)
    low = saved_lora("builtin:tiny-wan22", tmp_path / "low", seed=2)
    pipe = quiet_builtin("builtin:tiny-wan22")
    config = GenerationConfig(steps=8, batch_size=1, guidance_scale=5.0, guidance_scale_2=3.0)
    images_of = partial(first_images, pipe, config, load_prompts("builtin", 1))
    baseline = images_of()
    few = {"steps": {"num_inference_steps": 4}}
    assert "give lora_2" in pipeline_problem(["distill"], pipe, {"distill": {"lora": str(high)}})
    settings = [{"distill": {"lora": str(high), "lora_2": str(low)}, **few},
                {"distill": {"lora": str(high), "lora_2": str(high)}, **few}]  # the same LoRA in both
    results = []
    for setting in settings:
        applied = apply_setting(pipe, setting)
        try:
            assert pipe.get_list_adapters() == {"transformer": ["optsearch-distill"],
                                                "transformer_2": ["optsearch-distill"]}
            results.append(images_of(applied))
            assert applied.ran_with()["distill"]["call"] == {"guidance_scale": 1.0, "guidance_scale_2": 1.0}
            assert applied.computed_fraction() == pytest.approx(0.5 * 0.5)
        finally:
            applied.restore()
        assert lora_parameters(pipe) == 0 and sum("lora_" in name for name, _ in
                                                  pipe.transformer_2.named_parameters()) == 0
        np.testing.assert_array_equal(images_of(), baseline)
    assert not np.array_equal(*results)  # the second expert ran its own LoRA
    # pairs as recipes (lightx2v's releases): each recipe's lora_2 counts, none at the table
    spec = load_spec(write_spec(tmp_path / "pairs.toml", DISTILL_SPEC.replace(
        "builtin:tiny", "builtin:tiny-wan22").replace('"deepcache"', '"fbcache"')
        + f'[space.distill]\nlora = "{high}"\n'
        f'[[space.distill.recipes]]\nname = "V1.1"\nlora_2 = "{low}"\n'
        f'[[space.distill.recipes]]\nname = "V2.0"\nlora_2 = "{high}"\n'))
    assert spec.searched_values("distill")["lora_2"] == [str(low), str(high)]
    assert pipeline_problem(["distill", "steps"], pipe, {"distill": spec.searched_values("distill")}) \
        is None
    one = quiet_builtin("builtin:tiny")
    assert "has one denoiser" in pipeline_problem(["distill"], one, {"distill": {"lora_2": ["x"]}})


def test_a_fused_distilled_lora_adds_no_layer_and_its_weights_come_back_bit_for_bit(tmp_path):
    lora = saved_lora("builtin:tiny", tmp_path / "lightning", seed=1)
    pipe = quiet_builtin("builtin:tiny")
    config = GenerationConfig(steps=8, batch_size=2)
    images_of = partial(first_images, pipe, config, load_prompts("builtin", 2))
    baseline, layers = images_of(), layer_types(pipe)
    weights = {name: tensor.clone() for name, tensor in denoiser(pipe).state_dict().items()}
    setting = {"distill": {"lora": str(lora), "lora_scale": 0.8}, "steps": {"num_inference_steps": 4}}
    results = {}
    for fuse in (False, True):
        applied = apply_setting(pipe, {**setting, "distill": {**setting["distill"], "fuse": fuse}})
        try:
            assert (lora_parameters(pipe) == 0) == fuse  # fused: no adapter runs at each step
            results[fuse] = images_of(applied).astype(int)
        finally:
            applied.restore()
        assert layer_types(pipe) == layers
        assert all(torch.equal(weights[name], tensor) for name, tensor in denoiser(pipe).state_dict().items())
        np.testing.assert_array_equal(images_of(), baseline)
    assert np.abs(results[True] - results[False]).max() <= 1  # fused at 0.8, as the adapter ran
    assert np.abs(results[True] - baseline).mean() > 4 * np.abs(results[True] - results[False]).mean()


def test_a_fused_loras_weights_are_copied_once_per_process_and_again_after_they_change(tmp_path):
    """The CPU copy unfusing needs (for Qwen-Image about the whole transformer) is made at the
    first fused trial and reused, unless the layer's weights changed since (a LoRA the user fused)."""
    from optsearch.accelerators import distill

    lora = saved_lora("builtin:tiny", tmp_path / "lightning", seed=1)
    pipe = quiet_builtin("builtin:tiny")
    setting = {"distill": {"lora": str(lora), "fuse": True}, "steps": {"num_inference_steps": 4}}
    held_before = distill.kept_bytes()
    distill.keep_between_applies(False)  # a server applying once: restoring frees the copy
    applied = apply_setting(pipe, setting)
    assert distill.kept_bytes() > held_before
    applied.restore()
    assert distill.kept_bytes() == held_before
    distill.keep_between_applies()  # as a search's Evaluator sets it

    def fused_trial() -> dict:
        """Apply and restore; the kept copies of this pipeline's layers, by layer."""
        applied = apply_setting(pipe, setting)
        applied.restore()
        layers = set(denoiser(pipe).modules())
        return {layer: kept["weights"]["weight"] for layer, kept in distill._KEPT.items()
                if layer in layers}

    first = fused_trial()
    adapted_bytes = sum(layer.weight.nbytes + (layer.bias.nbytes if layer.bias is not None else 0)
                        for layer in first)
    assert first and distill.kept_bytes() - held_before == adapted_bytes
    second = fused_trial()
    assert second.keys() == first.keys()
    assert all(second[layer] is first[layer] for layer in first)  # no copy made again
    assert distill.kept_bytes() - held_before == adapted_bytes
    changed = next(iter(first))
    with torch.no_grad():
        changed.weight.add_(0.5)  # as fusing another LoRA would
    edited = changed.weight.detach().clone()
    third = fused_trial()
    assert third[changed] is not first[changed]
    assert torch.equal(changed.weight, edited)  # the weights as they were before this trial
    assert all(third[layer] is first[layer] for layer in first if layer is not changed)


def test_check_says_the_host_memory_a_fused_loras_copy_takes(tmp_path):
    """A fused trial keeps the adapted layers' weights on the CPU (for Qwen-Image about the whole
    transformer): `check` counts them, so a host that cannot hold them is told before a worker dies."""
    from optsearch.cli.memory_facts import fused_copy_text
    from optsearch.cli.preflight import check, format_report

    saved_lora("builtin:tiny", tmp_path / "lightning", seed=1)
    text = DISTILL_SPEC + '[space.distill]\nlora = "./lightning"\nfuse = [false, true]\n'
    spec = load_spec(write_spec(tmp_path / "fused.toml", text))
    report = check(spec)
    assert report.problems == []
    projections = ("to_q", "to_k", "to_v", "to_out.0")  # what saved_lora adapts
    expected = sum(tensor.nbytes for name, module in denoiser(quiet_builtin("builtin:tiny")).named_modules()
                   if name.endswith(projections)
                   for tensor in (module.weight, module.bias) if tensor is not None)
    assert report.facts["fused_copy_bytes"] == expected > 0
    assert (f"distill fused: keeps {expected / 2**20:.3g} MiB of the layers its LoRA adapts in host "
            "memory, to unfuse after each trial (one copy per worker)") in format_report(report, spec)
    short = fused_copy_text({"fused_copy_bytes": 3 * 2**30, "host_available_gib": 2.0})
    assert short[1] == ("memory: distill's fused copy needs more than the 2.0 GiB of host memory "
                        "available now: add host memory, or search space.distill.fuse = false")
    assert len(fused_copy_text({"fused_copy_bytes": 3 * 2**30, "host_available_gib": 8.0})) == 1
    unfused = load_spec(write_spec(tmp_path / "adapter.toml", text.replace("[false, true]", "false")))
    assert check(unfused).facts["fused_copy_bytes"] is None  # searched as an adapter: no copy


def test_a_study_searches_several_distilled_lora_files_and_loads_each_before_its_baseline(tmp_path):
    four = saved_lora("builtin:tiny", tmp_path / "lightning-4", seed=1)
    eight = saved_lora("builtin:tiny", tmp_path / "lightning-8", seed=2)
    text = DISTILL_SPEC + '[space.distill]\nlora = ["./lightning-4", "./lightning-8"]\n'
    spec = load_spec(write_spec(tmp_path / "two.toml", text))
    assert spec.grid_values("distill", "lora") == [str(four), str(eight)]  # read beside the spec
    drawn = [suggest_setting(optuna.trial.FixedTrial({"combo": "distill+steps", "distill.lora": lora,
                                                       "steps.num_inference_steps": 4}), spec)
             for lora in (str(four), str(eight))]
    assert [setting["distill"]["lora"] for setting in drawn] == [str(four), str(eight)]
    assert [s["distill"]["lora"] for s in spec.distill_settings()] == [str(four), str(eight)]
    (tmp_path / "shift3.json").write_text('{"shift": 3.0}')  # recipes searched: files read in
    recipes = text + 'scheduler_config = ["shift3.json", \'{"shift": 1.0}\']\n'
    spec = load_spec(write_spec(tmp_path / "recipes.toml", recipes))
    assert spec.space["distill"]["scheduler_config"] == ['{"shift": 3.0}', '{"shift": 1.0}']
    other = saved_lora("builtin:tiny-flux", tmp_path / "flux-lora")  # the second cannot load
    spec = load_spec(write_spec(tmp_path / "bad.toml", text.replace("./lightning-8", str(other))))
    with pytest.raises(ModelLoadError, match="flux-lora.* adapts no layer"):
        pipeline_from_spec(spec)


def test_a_fused_distilled_lora_runs_on_the_compiled_denoiser(tmp_path):
    from optsearch.measure.compiling import compile_denoiser, graphs_compiled

    lora = saved_lora("builtin:tiny-flux", tmp_path / "turbo", seed=1)
    pipe = quiet_builtin("builtin:tiny-flux")
    compile_denoiser(pipe, "regional", backend="eager")  # traced as inductor would, no codegen
    config = GenerationConfig(steps=6, batch_size=1, guidance_scale=3.5)
    images_of = partial(first_images, pipe, config, load_prompts("builtin", 1))
    baseline = images_of()
    setting = {"distill": {"lora": str(lora), "lora_scale": 0.6, "fuse": True},
               "steps": {"num_inference_steps": 4}}
    compiled = []
    for _ in range(2):  # loaded, fused and unloaded before any call: the blocks compiled stay
        applied = apply_setting(pipe, setting)
        try:
            fused = images_of(applied)
        finally:
            applied.restore()
        compiled.append(graphs_compiled())
    assert compiled[1] == compiled[0]  # a first trial may compile each block again, once (the
    # untimed warm-up's); the next compiles nothing
    assert not np.array_equal(fused, baseline)  # the compiled blocks ran the fused weights
    np.testing.assert_array_equal(images_of(), baseline)
    assert graphs_compiled() == compiled[1]  # nor the baseline after
    text = DISTILL_SPEC.replace("steps = 8\n", 'steps = 8\ncompile = "regional"\n')
    text += f'[space.distill]\nlora = "{lora}"\nfuse = true\n'
    spec = load_spec(write_spec(tmp_path / "s.toml", text))
    assert spec.model.compile == "regional"  # fused, a compiled study takes distill


def test_a_distilled_models_dbcache_range_is_shown_per_fn_as_its_trials_sample_it(tmp_path):
    """DBCache's "auto" threshold is calibrated per Fn, on the plain model and on a LoRA's
    distilled model alike: `check` and `study show` print the LoRA's range per Fn too, as its
    trials sample it (they printed one range per LoRA)."""
    from tests.test_families import DBCACHE_SPEC

    lora = saved_lora("builtin:tiny-flux", tmp_path / "lora", seed=1)
    text = DBCACHE_SPEC.replace('accelerators = [["dbcache"]]',
                                'accelerators = [["dbcache"], ["distill", "steps", "dbcache"]]') \
        .replace("n_trials = 2", "n_trials = 1") \
        + '[space.dbcache]\nFn_compute_blocks = [1, 2]\nmax_warmup_steps = 1\n' \
        + f'[space.distill]\nlora = "{lora}"\nnum_inference_steps = 4\n'
    spec = write_spec(tmp_path / "db.toml", text)
    url = f"sqlite:///{tmp_path}/db.db"
    ran = optsearch_cmd("run", str(spec), "--storage", url, "--quiet", "--artifact-dir",
                        str(tmp_path / "art"))
    assert ran.returncode == 0, ran.stderr
    study = optuna.load_study(study_name="flux", storage=url)
    [calibration] = [v for k, v in study.user_attrs.items()
                     if k.startswith("optsearch:calibration:") and k.endswith(":dbcache")]
    by, per_fn = calibration["under"][str(lora)]["by"]["residual_diff_threshold"]
    assert by == "Fn_compute_blocks" and sorted(per_fn) == ["1", "2"]
    assert per_fn != calibration["by"]["residual_diff_threshold"][1]  # the distilled model's own
    low, high = calibration["under"][str(lora)]["auto"]["residual_diff_threshold"]
    said = f"  on the distilled model of {lora} (its trials sample this): [{low}, {high}]; per " \
           f"Fn_compute_blocks: 1 [{per_fn['1'][0]}, {per_fn['1'][1]}], 2 [{per_fn['2'][0]}, " \
           f"{per_fn['2'][1]}]"
    shown = optsearch_cmd("study", "show", "flux", "--storage", url)
    assert shown.returncode == 0 and said in shown.stdout, shown.stdout
    as_json = json.loads(optsearch_cmd("study", "show", "flux", "--storage", url, "--json").stdout)
    [under_by] = as_json["auto_ranges_under_by"].values()
    assert under_by["dbcache.residual_diff_threshold"][str(lora)] == [by, per_fn]
    checked = optsearch_cmd("check", str(spec))  # measured again here: the same model, per Fn
    assert checked.returncode == 0, checked.stderr
    [line] = [line for line in checked.stdout.splitlines() if "on the distilled model of" in line]
    assert "; per Fn_compute_blocks: 1 [" in line and ", 2 [" in line


def test_one_lora_file_with_two_schedulers_is_calibrated_as_two_models(tmp_path):
    """Two recipes of one LoRA file that swap in different schedulers denoise along different
    timesteps: a cache's "auto" range is calibrated on each, kept apart (`distill.lora_key`
    names the scheduler), and each recipe's trials sample their own. The recipe's scheduler
    takes a setting the model's config left at its default (diffusers' from_config drops such
    keys from a config dict: the shift stayed 1.0, and both calibrations read the same)."""
    from optsearch.measure.evaluate import evaluator_from_spec
    from tests.test_families import FLUX_SPEC

    lora = saved_lora("builtin:tiny-flux", tmp_path / "lightning", seed=1)
    shifted = '{"shift": 6.0, "use_dynamic_shifting": false}'  # as the spec keeps it
    text = FLUX_SPEC.replace('[["steps"], ["magcache"], ["steps", "taylorseer"]]',
                             '[["distill", "steps", "fbcache"]]') \
        + f'[space.distill]\nlora = "{lora}"\nnum_inference_steps = 4\n' \
        + '[[space.distill.recipes]]\nname = "as-trained"\n' \
        + f"[[space.distill.recipes]]\nname = \"shifted\"\nscheduler_config = '{shifted}'\n"
    spec = load_spec(write_spec(tmp_path / "schedulers.toml", text))
    keys = [condition.lora for condition in spec.calibration_conditions("fbcache")]
    assert keys == [str(lora), f"{lora} with scheduler {shifted}"]
    pipe = build_builtin("builtin:tiny-flux")
    assert pipe.scheduler.config.shift == 1.0 and "shift" in pipe.scheduler.config._use_default_values
    with optsearch.apply(pipe, spec.calibration_conditions("fbcache")[1].setting):
        assert (pipe.scheduler.config.shift, pipe.scheduler.config.use_dynamic_shifting) == (6.0, False)
    assert pipe.scheduler.config.shift == 1.0  # the model's back
    evaluator = evaluator_from_spec(spec, pipe=pipe, prompts=load_prompts("builtin", 4))
    ranges = evaluator.auto_ranges(spec)["fbcache.threshold"]
    assert set(ranges.under) == set(keys) and ranges.under[keys[0]] != ranges.under[keys[1]]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        setting = suggest_setting(trial, spec, {"fbcache.threshold": ranges})
        study.tell(trial, 1.0)
        low, high = ranges.under[keys[trial.params["distill.recipe"] == "shifted"]]
        assert low <= setting["fbcache"]["threshold"] <= high


@pytest.mark.parametrize("recipe, says", [
    ('{"timestep_spacin": "trailing"}', "DDIMScheduler takes no setting 'timestep_spacin' (its settings: "),
    ('{"_class_name": "EulerScheduler"}', "diffusers has no scheduler 'EulerScheduler'"),
], ids=["a-typo", "no-such-class"])
def test_a_recipes_scheduler_setting_diffusers_would_ignore_is_refused_at_load(tmp_path, recipe, says):
    """diffusers ignores a scheduler setting its class has not (a log line): a recipe with a typo
    would measure the model's own scheduler under the recipe's name. `check` refuses it at load,
    one line, exit 2; a copied scheduler_config.json's own keys ("_diffusers_version") pass."""
    saved_lora("builtin:tiny", tmp_path / "lightning", seed=1)
    text = DISTILL_SPEC + '[space.distill]\nlora = "./lightning"\nnum_inference_steps = 2\n' \
        + f"scheduler_config = '{recipe}'\n"
    result = optsearch_cmd("check", str(write_spec(tmp_path / "typo.toml", text)))
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    copied = json.dumps({"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.30.0",
                         "timestep_spacing": "trailing"})
    setting = {"distill": {"lora": "x", "scheduler_config": copied}}
    assert pipeline_problem(("distill",), build_builtin("builtin:tiny"), setting) is None
