"""FLUX.2 [dev] and [klein]: the real Flux2Pipeline and Flux2KleinPipeline, tiny
(builtin:tiny-flux2, builtin:tiny-flux2-klein). Each cache that runs on their transformer is
searched, measured, restored and exported; diffusers' FirstBlockCache, which fails on it, is
refused in one line; reference images run one a call."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch
from diffusers import FirstBlockCacheConfig, Flux2KleinPipeline, Flux2Pipeline
from PIL import Image

import optsearch
from optsearch.accelerators import AppliedSetting
from optsearch.errors import PromptError
from optsearch.measure.builtin import build_builtin
from optsearch.measure.generation import check_conditioning
from optsearch.measure.model_ids import model_kind
from optsearch.measure.models import ModelLoadError, load_pipeline
from optsearch.measure.prompts import ConditionedPrompt
from optsearch.measure.served import check_families
from optsearch.study_spec import spec_from_dict
from tests.conftest import optsearch_cmd, write_spec
from tests.test_deploy_exports import export, exported_function, study_with_winner

PROMPTS = ["a red bus in the rain", "a small cat on a sofa"]

SPEC = """
name = "flux2"
[model]
id = "builtin:tiny-flux2"
device = "cpu"
steps = 8
guidance_scale = 4.0
[prompts]
source = "builtin"
num_samples = 2
batch_size = 2
[quality]
clip_model = "builtin:tiny"
clip_pretrained = "none"
metric = "psnr"
limit = 20.0
[search]
accelerators = [["taylorseer"], ["pab"], ["magcache"], ["dbcache"]]
n_trials = 4
warm_start = []
seed = 0
[space.taylorseer]
disable_cache_before_step = [1, 3]
[space.dbcache]
residual_diff_threshold = "auto"
Fn_compute_blocks = 1
max_warmup_steps = 2
[space.magcache]
threshold = "auto"
"""

# a setting of each family that skips work on tiny FLUX.2 at 8 steps (MagCache and DBCache
# thresholds: inside their calibrated ranges, which the study test draws from)
SETTINGS = {
    "taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2, "max_order": 1},
    "pab": {"spatial_attention_block_skip_range": 2, "timestep_skip_high": 1000},
    "dbcache": {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.9,
                "max_warmup_steps": 2},
}


def flux2_images(call, steps: int = 8) -> np.ndarray:
    """FLUX.2's call takes its reference images first: the prompts go by name."""
    generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    output = call(prompt=PROMPTS, num_inference_steps=steps, generator=generators, output_type="np")
    return (output.images * 255).round().clip(0, 255).astype(np.uint8)


LOADED: dict = {}


def loaded(model_id: str):
    """Each builtin FLUX.2 pipeline once per module."""
    if model_id not in LOADED:
        LOADED[model_id] = load_pipeline(model_id, device="cpu", dtype="float32")
        LOADED[model_id].set_progress_bar_config(disable=True)
    return LOADED[model_id]


@pytest.fixture(scope="module")
def flux2_pipe():
    return loaded("builtin:tiny-flux2")


def test_tiny_flux2_is_the_real_pipeline_and_a_transformer(flux2_pipe):
    assert isinstance(flux2_pipe, Flux2Pipeline) and model_kind("builtin:tiny-flux2") == "transformer"
    assert model_kind("black-forest-labs/FLUX.2-dev") == "transformer"  # by name, no download
    assert type(flux2_pipe.transformer).__name__ == "Flux2Transformer2DModel"
    klein = loaded("builtin:tiny-flux2-klein")
    assert isinstance(klein, Flux2KleinPipeline) and not klein.config.is_distilled
    assert model_kind("builtin:tiny-flux2-klein") == "transformer"


@pytest.mark.parametrize("model_id", ["builtin:tiny-flux2", "builtin:tiny-flux2-klein"])
@pytest.mark.parametrize("family", sorted(SETTINGS))
def test_each_cache_skips_work_on_flux2_and_restores_it_exactly(model_id, family):
    """[dev]'s loop names no cache context and passes the timestep / 1000 (as FLUX.1 Fill's);
    [klein]'s runs two calls a step (true CFG, "cond" and "uncond"): each family still acts
    (computes less, other images), and leaving restores every bit."""
    pipe = loaded(model_id)
    baseline = flux2_images(pipe)
    with AppliedSetting(pipe, {family: SETTINGS[family]}) as applied:
        cached = flux2_images(applied)
        assert 0.0 < applied.computed_fraction() < 1.0
    assert np.abs(cached.astype(int) - baseline).max() > 0
    np.testing.assert_array_equal(flux2_images(pipe), baseline)


def test_fbcache_is_refused_on_flux2_in_one_line_where_diffusers_would_fail():
    """diffusers' FirstBlockCache adds the last block's residual to the first block's output:
    FLUX.2's first returns text and image tokens apart, its last joined, and the first call
    fails. The spec is refused before any trial, naming why; FLUX.1, whose blocks agree, is not."""
    for model_id in ("builtin:tiny-flux2", "builtin:tiny-flux2-klein"):
        spec = spec_from_dict({"model": {"id": model_id}, "search": {"accelerators": [["fbcache"]]}})
        with pytest.raises(ModelLoadError, match="fbcache cannot run on Flux2Transformer2DModel"):
            check_families(loaded(model_id), spec)
    pipe = build_builtin("builtin:tiny-flux2")  # diffusers' own hook, unguarded
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pipe.transformer.cache_context("cond"), pytest.raises(TypeError, match="unsupported operand"):
        pipe(prompt=PROMPTS[:1], num_inference_steps=2, output_type="np")  # (its loop names none)
    flux1 = load_pipeline("builtin:tiny-flux", device="cpu", dtype="float32")
    check_families(flux1, spec_from_dict({"model": {"id": "builtin:tiny-flux"},
                                          "search": {"accelerators": [["fbcache"]]}}))


def test_any_on_flux2_names_the_combos_to_write(tmp_path):
    spec = SPEC.replace('accelerators = [["taylorseer"], ["pab"], ["magcache"], ["dbcache"]]',
                        'accelerators = "any"').split("[space.dbcache]")[0]
    result = optsearch_cmd("check", str(write_spec(tmp_path / "s.toml", spec)))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "fbcache cannot run on Flux2Transformer2DModel" in result.stderr
    assert ('"any" includes fbcache: write search.accelerators = [["steps"], ["taylorseer"], '
            '["pab"], ["magcache"], ["dbcache"]]') in result.stderr


def test_a_flux2_study_measures_every_family(tmp_path):
    """A worker on the real pipeline: MagCache's and DBCache's ranges calibrated on it, one trial
    of each family, each computing part of the work, none failed."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = str(write_spec(tmp_path / "s.toml", SPEC))
    assert optsearch_cmd("study", "create", spec, "--storage", url).returncode == 0
    study = optuna.load_study(study_name="flux2", storage=url)
    for combo in ("taylorseer", "pab", "magcache", "dbcache"):  # one trial each, the rest sampled
        study.enqueue_trial({"combo": combo})
    result = optsearch_cmd("run", spec, "--storage", url, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trials = study.trials
    assert sorted(t.user_attrs["combo"] for t in trials) == ["dbcache", "magcache", "pab", "taylorseer"]
    for trial in trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
        assert 0.0 < trial.user_attrs["compute_fraction"] < 1.0, trial.user_attrs["setting"]


@pytest.mark.parametrize("family", ["dbcache", "taylorseer"])
def test_the_python_export_serves_flux2_as_optsearch_measured_it(tmp_path, family):
    """The exported `accelerate(pipe)` (diffusers' hooks, cache-dit) on a fresh FLUX.2 pipeline
    makes the images `optsearch.apply` makes with the same setting."""
    setting = {family: SETTINGS[family]}
    url = study_with_winner(tmp_path, SPEC, setting)
    accelerate = exported_function(export(tmp_path, url, "flux2", "diffusers", "accelerate_pipe.py"))
    with optsearch.apply(build_builtin("builtin:tiny-flux2"), setting) as run:
        expected = flux2_images(run)
    pipe = build_builtin("builtin:tiny-flux2")
    served = accelerate(pipe)  # the call's arguments: its step count
    np.testing.assert_array_equal(flux2_images(lambda **call: pipe(**{**call, **served})), expected)


def test_reference_images_run_one_prompt_a_call(flux2_pipe):
    """FLUX.2 [dev] conditions every prompt of a call on all the call's images (its references):
    prompts with their own images run one a call, said in one line otherwise."""
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    prompts = [ConditionedPrompt("make it blue", image), ConditionedPrompt("make it green", image)]
    check_conditioning(flux2_pipe, prompts, batch_size=1)
    with pytest.raises(PromptError, match="conditions every prompt of a call on the call's images: set "
                                          "prompts.batch_size = 1"):
        check_conditioning(flux2_pipe, prompts, batch_size=2)
    check_conditioning(flux2_pipe, PROMPTS, batch_size=2)  # text prompts: batched


def test_a_block_class_diffusers_does_not_know_is_refused_for_its_block_caches(tmp_path):
    """diffusers' FirstBlockCache and MagCache read each block's outputs by its registered class:
    a block class its registry lacks (a newer model's, or a subclass a user's patch puts in)
    fails when the cache is enabled. Such a pipeline is refused at load, in one line naming the
    class; the builtin transformers and video models, whose blocks it knows, are not."""
    from diffusers import FluxPipeline, MagCacheConfig
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    class PatchedFluxBlock(FluxTransformerBlock):
        """What a user's patch of FLUX's double blocks leaves: the same forward, another class."""

    pipe = FluxPipeline(**build_builtin("builtin:tiny-flux").components)
    for block in pipe.transformer.transformer_blocks:
        block.__class__ = PatchedFluxBlock
    for family in ("fbcache", "magcache"):
        spec = spec_from_dict({"model": {"id": "builtin:tiny-flux"},
                               "search": {"accelerators": [[family]]}})
        with pytest.raises(ModelLoadError, match=f"{family} cannot run on FluxTransformer2DModel: "
                                                 f".* knows no PatchedFluxBlock"):
            check_families(pipe, spec)
    with pytest.raises(ValueError, match="not registered"):  # what the user met before
        pipe.transformer.enable_cache(MagCacheConfig(mag_ratios=[1.0] * 4, num_inference_steps=4))
    for model_id in ("builtin:tiny-flux", "builtin:tiny-qwen-image", "builtin:tiny-wan",
                     "builtin:tiny-wan22"):
        plain = load_pipeline(model_id, device="cpu", dtype="float32")
        check_families(plain, spec_from_dict({"model": {"id": model_id},
                                              "search": {"accelerators": [["fbcache"], ["magcache"]]}}))
