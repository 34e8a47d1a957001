"""Pyramid Attention Broadcast settings are known by the denoiser calls they broadcast at: a
window and a skip range decide nothing else, so settings that broadcast at the same calls are one
computation, measured once."""

import itertools

import numpy as np
import pytest

from optsearch.accelerators import AppliedSetting, canonical_setting, pab, same_computation_why
from optsearch.measure.models import load_pipeline
from tests.conftest import generate_images

STEPS = 8


@pytest.mark.parametrize("model", ["builtin:tiny-flux", "builtin:tiny"])
def test_settings_that_broadcast_at_the_same_calls_make_the_same_images(model):
    """Over skip ranges and windows on a transformer (the pipeline's own timestep) and a UNet (a
    probe's reading): two settings share a key exactly when their images are bit-identical. A
    window that takes in the first call broadcasts nothing more there (the first call computes);
    measured at another step count, settings are compared as written."""
    pipe = load_pipeline(model, device="cpu", dtype="float32")
    measured = pab.measure_timesteps(pipe, STEPS, lambda: generate_images(pipe, ["a cat"], STEPS))
    assert len(measured["timesteps"]) == STEPS and measured["step_count"] == STEPS
    assert measured["timesteps"] == sorted(measured["timesteps"], reverse=True)

    def setting(every: int, high: int) -> dict:
        return {"pab": {"spatial_attention_block_skip_range": every, "timestep_skip_high": high}}

    settings = [(every, high) for every in (2, 3, 5, 6) for high in (700, 800, 877, 1000)]
    keys, images = {}, {}
    for every, high in settings:
        keys[every, high] = canonical_setting(setting(every, high), STEPS, {"pab": measured})
        with AppliedSetting(pipe, setting(every, high)) as applied:
            images[every, high] = generate_images(applied, ["a red bus", "a cat"], steps=STEPS)
    for one, other in itertools.combinations(settings, 2):
        assert (keys[one] == keys[other]) == np.array_equal(images[one], images[other]), (one, other)
    assert 4 < len({str(key) for key in keys.values()}) < len(settings)  # twins, and distinct ones
    assert canonical_setting(setting(2, 800), STEPS - 2, {"pab": measured}) == setting(2, 800)
    assert same_computation_why(setting(6, 952), setting(6, 976)) == \
        "same attention broadcast, same device: the same computation"  # what a copy records
