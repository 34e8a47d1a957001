"""Z-Image (Turbo: 8-step distilled): fewer steps and cache-dit's DBCache run on the real pipeline;
diffusers' caches need the transformer's enable_cache, which Z-Image's lacks, and are refused at
load in one line, "any" with the list that applies."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from optsearch.errors import ModelLoadError
from optsearch.measure.generation import GenerationConfig
from optsearch.measure.prompts import load_prompts
from optsearch.measure.served import check_families
from optsearch.study_spec import load_spec, spec_from_dict
from tests.conftest import one_trial_of_each, write_spec
from tests.test_image_conditioned import assert_each_skips_and_restores, first_images, quiet_builtin


@pytest.fixture(scope="module")
def z_image():
    return quiet_builtin("builtin:tiny-z-image")


def spec_of(accelerators) -> dict:
    return {"name": "z", "model": {"id": "builtin:tiny-z-image", "device": "cpu", "steps": 9,
                                   "guidance_scale": 0.0},
            "search": {"accelerators": accelerators}}


def test_fewer_steps_and_dbcache_skip_work_and_leave_no_trace(z_image):
    config = GenerationConfig(steps=9, height=64, width=64, guidance_scale=0.0, batch_size=2)
    images = partial(first_images, z_image, config, load_prompts("builtin", 2))
    baseline = images()
    assert_each_skips_and_restores(z_image, lambda applied: images(applied), (
        {"steps": {"num_inference_steps": 5}},
        {"dbcache": {"residual_diff_threshold": 1.0, "max_warmup_steps": 2, "Fn_compute_blocks": 1,
                     "Bn_compute_blocks": 0}}), baseline)


@pytest.mark.parametrize("family", ["fbcache", "magcache", "taylorseer", "pab", "fastercache"])
def test_diffusers_caches_are_refused_in_one_line(z_image, family):
    with pytest.raises(ModelLoadError) as refused:
        check_families(z_image, spec_from_dict(spec_of([[family]])))
    assert len(str(refused.value).splitlines()) == 1
    if family != "taylorseer":  # which names its own reason first: no module it hooks
        assert f"{family} needs diffusers' enable_cache, which ZImageTransformer2DModel lacks " \
               "(steps, distill and dbcache apply)" in str(refused.value)


def test_any_names_what_applies(z_image):
    check_families(z_image, spec_from_dict(spec_of([["steps"], ["dbcache"], ["steps", "dbcache"]])))
    with pytest.raises(ModelLoadError, match=r'"any" includes fbcache: write search.accelerators = '
                                             r'\[\["steps"\], \["dbcache"\]\]$'):
        check_families(z_image, spec_from_dict(spec_of("any")))


SPEC = """
name = "z"
[model]
id = "builtin:tiny-z-image"
device = "cpu"
steps = 9
height = 64
width = 64
guidance_scale = 0.0
[prompts]
source = "builtin"
num_samples = 4
batch_size = 2
[quality]
clip_model = "builtin:tiny"
clip_pretrained = "none"
metric = "psnr"
limit = 10.0
[search]
accelerators = [["steps"], ["dbcache"]]
n_trials = 2
warm_start = []
early_stop = false
seed = 0
[space.steps]
num_inference_steps = [4, 7]
[space.dbcache]
Fn_compute_blocks = [1, 2]
Bn_compute_blocks = 0
residual_diff_threshold = "auto"
max_warmup_steps = [1, 3]
"""


def test_a_z_image_study_calibrates_dbcache_and_measures_both(tmp_path, z_image):
    spec = load_spec(write_spec(tmp_path / "z.toml", SPEC))
    trials = one_trial_of_each(tmp_path, spec, z_image, ("steps", "dbcache"))
    assert all(np.isfinite(trial.user_attrs["psnr"]) for trial in trials)
