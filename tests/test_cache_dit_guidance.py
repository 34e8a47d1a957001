"""cache-dit takes Qwen-Image (and Wan) to run guidance as separate transformer calls and counts
two calls as one step. A call that runs none (Qwen-Image without true CFG, as its distilled
variants serve) must say so, or cache-dit's steps are half the real ones and masks, warm-ups and
calibrations land on the wrong steps; the export must say so too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline

import optsearch
from optsearch.accelerators import apply_setting, dbcache, normalize_setting
from optsearch.measure.builtin import build_builtin
from optsearch.measure.models import load_pipeline

from .conftest import optsearch_cmd
from .test_deploy_exports import study_with_winner
from .test_families import DBCACHE_SPEC

PROMPTS = ["a red bus in the rain", "a small cat on a sofa"]
NO_CFG = {"true_cfg_scale": 1.0}
TRUE_CFG = {"true_cfg_scale": 4.0, "negative_prompt": [" ", " "]}


@pytest.fixture(scope="module")
def qwen():
    pipe = build_builtin("builtin:tiny-qwen-image")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(call, guidance: dict, steps: int = 12) -> np.ndarray:
    """128 px, as builtin:tiny-qwen-image makes by default (a plain QwenImagePipeline built from
    its components would make 1024 px: 20 s a call here)."""
    generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return call(PROMPTS, num_inference_steps=steps, generator=generators, output_type="np",
                height=128, width=128, **guidance).images


def _cached_steps(pipe) -> list[int]:
    import cache_dit

    stats = [s for s in cache_dit.summary(pipe, logging=False) if s.cache_options]
    return sorted({int(step) for stat in stats for step in (stat.cached_steps or [])})


@pytest.mark.parametrize("guidance, told", [(NO_CFG, {"dbcache": {"enable_separate_cfg": False}}),
                                            (TRUE_CFG, {})], ids=["no-cfg", "true-cfg"])
def test_a_steps_mask_lands_on_the_real_steps_with_and_without_guidance(qwen, guidance, told):
    setting = normalize_setting({"dbcache": {"steps_computation_mask": "fast",
                                             "steps_computation_policy": "static"}})
    mask = dbcache.steps_mask("fast", 12)
    with apply_setting(qwen, setting) as fast:
        _images(fast, guidance)
        assert _cached_steps(qwen) == [step for step, computes in enumerate(mask) if not computes]
        assert fast.ran_with() == told


def test_the_calibration_sees_every_step_of_a_call_without_guidance(qwen):
    def run_once():
        _images(qwen, NO_CFG)

    measured = dbcache.calibrate(qwen, run_once, {"Fn_compute_blocks": [1]}, 12, NO_CFG)
    steps = {step for step, _ in dbcache._residual_diffs(qwen, run_once, 1, NO_CFG)}
    assert steps == set(range(1, 12))  # cache-dit's half steps (before): 1-5
    assert measured["observed"]["min"] > 0


def test_the_cache_dit_yaml_of_a_winner_measured_without_guidance_says_so(tmp_path):
    import cache_dit

    spec = DBCACHE_SPEC.replace("builtin:tiny-flux", "builtin:tiny-qwen-image")
    setting = {"dbcache": {"residual_diff_threshold": 0.6, "max_warmup_steps": 2,
                           "steps_computation_mask": "fast", "steps_computation_policy": "dynamic"}}
    url = study_with_winner(tmp_path, spec, setting,
                            calibration_used={"dbcache": {"enable_separate_cfg": False}})
    ran = optsearch_cmd("study", "export", "flux", "--storage", url, "--format", "cache-dit",
                        "-o", str(tmp_path / "cache.yaml"))
    assert ran.returncode == 0, ran.stderr
    assert "  enable_separate_cfg: false\n" in (tmp_path / "cache.yaml").read_text()
    expected_pipe = QwenImagePipeline(**build_builtin("builtin:tiny-qwen-image").components)
    expected_pipe.set_progress_bar_config(disable=True)
    with optsearch.apply(expected_pipe, setting) as run:
        expected = _images(run, NO_CFG)
    pipe = QwenImagePipeline(**build_builtin("builtin:tiny-qwen-image").components)
    pipe.set_progress_bar_config(disable=True)
    cache_dit.enable_cache(pipe, **cache_dit.load_configs(str(tmp_path / "cache.yaml")))
    np.testing.assert_array_equal(_images(pipe, NO_CFG), expected)
    assert _cached_steps(pipe)  # it skipped on the mask's steps


@pytest.mark.parametrize("guidance, told", [(1.0, {"dbcache": {"enable_separate_cfg": False}}),
                                            (5.0, {})], ids=["no-cfg", "cfg"])
def test_wan_at_guidance_1_is_told_too(guidance, told):
    """Wan runs its conditional and unconditional as two transformer calls when guidance_scale > 1
    and one call at 1 (how distilled Wan variants serve): a mask lands on the real steps both ways."""
    wan = load_pipeline("builtin:tiny-wan", device="cpu", dtype="float32")
    setting = normalize_setting({"dbcache": {"steps_computation_mask": "fast",
                                             "steps_computation_policy": "static"}})
    mask = dbcache.steps_mask("fast", 8)
    with apply_setting(wan, setting) as fast:
        fast(PROMPTS[:1], num_inference_steps=8, guidance_scale=guidance, output_type="np",
             generator=torch.Generator().manual_seed(0))
        assert _cached_steps(wan) == [step for step, computes in enumerate(mask) if not computes]
        assert fast.ran_with() == told
