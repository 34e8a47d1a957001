"""Exports that deploy without optsearch (issue 23): a cache-dit YAML and a Python `accelerate(pipe)`
made from the winner give the same images as `optsearch.apply` with the same setting."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, FluxPipeline
from optuna.trial import create_trial

import optsearch
from optsearch.measure.builtin import build_builtin
from optsearch.optimize.create import create_study
from optsearch.optimize.deploy import diffusers_python
from optsearch.optimize.export import export_study
from optsearch.optimize.study import load_study
from optsearch.storage.rdb import open_storage
from optsearch.study_spec import load_spec
from tests.conftest import TINY_SPEC, optsearch_cmd, write_spec
from tests.test_families import FLUX_SPEC

PROMPTS = ["a red cube on a table", "a small boat"]


def plain_flux() -> FluxPipeline:
    """The builtin tiny FLUX as a plain FluxPipeline (the class cache-dit knows by name), built
    afresh: each export is applied to its own copy."""
    pipe = FluxPipeline(**build_builtin("builtin:tiny-flux").components)
    pipe.default_sample_size = 16  # 128 px, as the builtin
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(call, num_inference_steps: int, kind: str, **kwargs) -> np.ndarray:
    """8-bit images, as optsearch records them (image digests) and users save them."""
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(len(PROMPTS))]
    options = {"max_sequence_length": 32, "guidance_scale": 3.5} if kind == "flux" else {}
    output = call(PROMPTS, num_inference_steps=num_inference_steps, generator=generators,
                  output_type="np", **options, **kwargs).images
    return (output * 255).round().clip(0, 255).astype(np.uint8)


def study_with_winner(tmp_path, spec_text: str, setting: dict, **attrs) -> str:
    """A study whose only feasible trial, faster than the baseline, has `setting` (made in this
    process: the command line is tested by the cache-dit tests) and `attrs`."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = load_spec(write_spec(tmp_path / "s.toml", spec_text))
    study = create_study(spec, open_storage(url, heartbeat_interval=None))
    study.add_trial(create_trial(value=2.0, user_attrs={
        "combo": "+".join(setting), "setting": setting, "speedup": 2.0, "speedup_low": 1.9,
        "speedup_high": 2.1, "psnr": 40.0, "psnr_low": 39.0, "psnr_high": 41.0,
        "constraints": {"quality": -1.0}, **attrs}))
    return url


def export(tmp_path, url: str, name: str, form: str, filename: str) -> str:
    """What `study export --format FORM` writes: by the command line for cache-dit, in this
    process for the Python form (the same functions)."""
    if form == "cache-dit":
        result = optsearch_cmd("study", "export", name, "--storage", url, "--format", form,
                               "-o", str(tmp_path / filename))
        assert result.returncode == 0, result.stderr
        text = (tmp_path / filename).read_text()
    else:
        study, spec = load_study(open_storage(url, heartbeat_interval=None), name)
        text = diffusers_python(export_study(study, spec))
    assert "import optsearch" not in text and "from optsearch" not in text
    # the header says what measured it (no baseline here: the installed releases), since an
    # older release may lack a config
    assert f"measured with torch {version('torch')}, diffusers {version('diffusers')}" in text.lower()
    assert "measured at batch " in text.lower()  # and what the figures hold for
    return text


def exported_function(text: str):
    """`accelerate(pipe)` from the Python export's text, loaded as a user would run the file
    (and as their linter reads it: no unused or undefined name)."""
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F",
                           "--stdin-filename", "accelerate_pipe.py", "-"],
                          input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    namespace: dict = {}
    exec(compile(text, "accelerate_pipe.py", "exec"), namespace)  # noqa: S102 - our own export
    return namespace["accelerate"]


DBCACHE = {"steps": {"num_inference_steps": 10},
           "dbcache": {"Fn_compute_blocks": 1, "Bn_compute_blocks": 1, "residual_diff_threshold": 0.6,
                       "max_warmup_steps": 2, "warmup_interval": 1, "max_cached_steps": -1,
                       "max_continuous_cached_steps": 2, "taylorseer_order": 1}}
DBCACHE_MASKED = {"steps": {"num_inference_steps": 10},  # cache-dit's "fast" steps mask at 10 steps
                  "dbcache": {**DBCACHE["dbcache"], "taylorseer_order": 0,
                              "steps_computation_mask": "fast", "steps_computation_policy": "static"}}
DBCACHE_SPEC = FLUX_SPEC.replace('[["steps"], ["magcache"], ["steps", "taylorseer"]]',
                                 '[["steps", "dbcache"], ["fbcache"], ["taylorseer"]]')


@pytest.mark.parametrize("setting", [DBCACHE, DBCACHE_MASKED], ids=["threshold", "steps-mask"])
def test_a_cache_dit_yaml_loads_in_cache_dit_and_matches_optsearch_apply(tmp_path, setting):
    import cache_dit

    url = study_with_winner(tmp_path, DBCACHE_SPEC, setting)
    text = export(tmp_path, url, "flux", "cache-dit", "cache.yaml")
    assert "num_inference_steps=10" in text
    masked = setting is DBCACHE_MASKED  # cache-dit's loader builds the mask from its name and steps
    assert ('steps_computation_mask: "fast"' in text) == masked == ("num_inference_steps: 10" in text)
    expected_pipe = plain_flux()
    with optsearch.apply(expected_pipe, setting) as run:
        expected = images(run, 12, kind="flux")  # apply caps the call at the setting's 10 steps
    pipe = plain_flux()
    cache_dit.enable_cache(pipe, **cache_dit.load_configs(str(tmp_path / "cache.yaml")))
    np.testing.assert_array_equal(images(pipe, 10, kind="flux"), expected)
    baseline = images(plain_flux(), 10, kind="flux")
    assert np.abs(expected.astype(int) - baseline).max() > 0  # the cache did skip something


@pytest.mark.parametrize("setting", [
    DBCACHE,
    DBCACHE_MASKED,
    {"fbcache": {"threshold": 0.6}},
    {"taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2, "max_order": 1}},
], ids=["dbcache", "dbcache-steps-mask", "fbcache", "taylorseer"])
def test_the_python_export_applies_the_winner_with_the_libraries_own_calls(tmp_path, setting):
    url = study_with_winner(tmp_path, DBCACHE_SPEC, setting)
    accelerate = exported_function(export(tmp_path, url, "flux", "diffusers", "accelerate_pipe.py"))
    with optsearch.apply(plain_flux(), setting) as run:
        expected = images(run, 12, kind="flux")
    pipe = plain_flux()
    np.testing.assert_array_equal(images(pipe, kind="flux", **accelerate(pipe)), expected)


SD_SPEC = TINY_SPEC.replace('accelerators = ["deepcache", "tome"]', 'accelerators = '
                           '[["steps", "deepcache"], ["deepcache", "tome"], ["tgate"], ["pab"]]') \
    + "[space.tgate]\ngate_step = [2, 6]\n"


@pytest.mark.parametrize("setting", [
    {"steps": {"num_inference_steps": 6}, "deepcache": {"cache_interval": 3, "cache_branch_id": 0}},
    {"deepcache": {"cache_interval": 3, "cache_branch_id": 0},
     "tome": {"ratio": 0.5, "max_downsample": 1, "use_rand": False}},
    {"tgate": {"gate_step": 4}},
    # the UNet has no enable_cache and SD's loop tracks no timestep: failed before with "no
    # attribute 'transformer'"
    {"pab": {"spatial_attention_block_skip_range": 2, "timestep_skip_low": 100, "timestep_skip_high": 900}},
], ids=["steps+deepcache", "deepcache+tome", "tgate", "pab"])
def test_the_python_export_on_an_sd_unet(tmp_path, setting):
    url = study_with_winner(tmp_path, SD_SPEC, setting)
    accelerate = exported_function(export(tmp_path, url, "tiny", "diffusers", "accelerate_pipe.py"))
    with optsearch.apply(build_builtin("builtin:tiny"), setting) as run:
        expected = images(run, 8, kind="sd")
    pipe = build_builtin("builtin:tiny")
    kwargs = accelerate(pipe)
    call = pipe.tgate if "tgate" in setting else pipe  # T-GATE generates through its own call
    np.testing.assert_array_equal(images(call, kind="sd", **kwargs), expected)
    assert not np.array_equal(expected, images(build_builtin("builtin:tiny"), 8, kind="sd"))


def test_a_cache_dit_export_of_another_family_is_one_line_exit_2(tmp_path):
    url = study_with_winner(tmp_path, DBCACHE_SPEC, {"fbcache": {"threshold": 0.6}})
    refused = optsearch_cmd("study", "export", "flux", "--storage", url, "--format", "cache-dit",
                            "-o", str(tmp_path / "c.yaml"))
    assert refused.returncode == 2 and "--format cache-dit needs a dbcache winner" in refused.stderr
    assert not (tmp_path / "c.yaml").exists()


def test_a_studys_scheduler_is_part_of_what_deploys(tmp_path):
    """A study that set `model.scheduler`: the export's deployment names it, the Python export
    sets it before the setting (same images as apply on a pipeline with it), and apply on the
    model's own scheduler warns."""
    spec = SD_SPEC.replace('id = "builtin:tiny"', 'id = "builtin:tiny"\nscheduler = "EulerDiscrete"')
    setting = {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}
    url = study_with_winner(tmp_path, spec, setting)
    study, loaded = load_study(open_storage(url, heartbeat_interval=None), "tiny")
    exported = export_study(study, loaded)
    assert exported["deployment"]["scheduler"] == "EulerDiscreteScheduler"
    accelerate = exported_function(diffusers_python(exported))
    served = build_builtin("builtin:tiny")
    served.scheduler = EulerDiscreteScheduler.from_config(served.scheduler.config)
    with optsearch.apply(served, setting) as run:
        expected = images(run, 8, kind="sd")
    pipe = build_builtin("builtin:tiny")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # the model's own
    np.testing.assert_array_equal(images(pipe, kind="sd", **accelerate(pipe)), expected)
    with pytest.warns(UserWarning, match="measured at scheduler = EulerDiscreteScheduler; called "
                                         "with DDIMScheduler"):
        with optsearch.apply(build_builtin("builtin:tiny"), exported) as run:
            images(run, 8, kind="sd")
