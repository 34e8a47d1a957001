"""Pyramid Attention Broadcast and FasterCache settings are known by the denoiser calls whose
attention they broadcast or reuse: a window and a skip range decide nothing else, so settings
that do it at the same calls are one computation, measured once."""

import itertools

import numpy as np
import pytest
import torch

from optsearch.accelerators import AppliedSetting, canonical_setting, pab, same_computation_why
from optsearch.measure.models import load_pipeline
from tests.conftest import generate_images, optsearch_cmd, write_spec
from tests.test_families import FLUX_SPEC

STEPS = 8


def _video(call, prompts: list[str]) -> np.ndarray:
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return call(prompts, num_inference_steps=STEPS, num_frames=9, guidance_scale=5.0, output_type="np",
                generator=generators).frames


@pytest.mark.parametrize("model, family", [("builtin:tiny-flux", "pab"), ("builtin:tiny", "pab"),
                                           ("builtin:tiny-wan", "pab"), ("builtin:tiny-wan", "fastercache"),
                                           ("builtin:tiny-wan22", "pab")])
def test_settings_that_skip_at_the_same_calls_make_the_same_images(model, family):
    """Over skip ranges and windows on a transformer (the pipeline's own timestep), a UNet (a
    probe's reading) and a video transformer whose guidance runs as a second call per step, with
    one expert or Wan 2.2's two (each expert's hooks count their own calls): two settings share a
    key exactly when their images are bit-identical (a window that takes in the first call changes
    nothing there: the first call computes). Measured at another step count, settings are
    compared as written."""
    pipe = load_pipeline(model, device="cpu", dtype="float32")

    def make(call, prompts):
        return _video(call, prompts) if model.startswith("builtin:tiny-wan") else \
            generate_images(call, prompts, steps=STEPS)

    measured = pab.measure_timesteps(pipe, STEPS, lambda: make(pipe, ["a cat"]))
    calls = 2 * STEPS if model.startswith("builtin:tiny-wan") else STEPS  # guidance: 2 calls a step
    assert len(measured["timesteps"]) == calls and measured["step_count"] == STEPS
    assert ("experts" in measured) == (model == "builtin:tiny-wan22")
    assert measured["timesteps"] == sorted(measured["timesteps"], reverse=True)

    def setting(every: int, high: int) -> dict:
        return {family: {"spatial_attention_block_skip_range": every, "timestep_skip_high": high}}

    settings = [(every, high) for every in (2, 3, 5) for high in (500, 700, 800, 880, 1000)]
    keys, images = {}, {}
    for every, high in settings:
        keys[every, high] = canonical_setting(setting(every, high), STEPS, {family: measured})
        with AppliedSetting(pipe, setting(every, high)) as applied:
            images[every, high] = make(applied, ["a red bus", "a cat"])
    for one, other in itertools.combinations(settings, 2):
        assert (keys[one] == keys[other]) == np.array_equal(images[one], images[other]), (one, other)
    assert 4 < len({str(key) for key in keys.values()}) < len(settings)  # twins, and distinct ones
    assert canonical_setting(setting(2, 800), STEPS - 2, {family: measured}) == setting(2, 800)


def test_a_copy_says_why_in_its_familys_words():
    def pab_setting(high: int) -> dict:
        return {"pab": {"spatial_attention_block_skip_range": 6, "timestep_skip_high": high}}

    assert same_computation_why(pab_setting(952), pab_setting(976)) == \
        "same attention broadcast, same device: the same computation"
    assert same_computation_why({"fastercache": {"timestep_skip_high": 700}},
                                {"fastercache": {"timestep_skip_high": 710}}) \
        .startswith("same attention reused")
    assert same_computation_why({"tome": {"ratio": 0.5}, "deepcache": {"cache_interval": 3}},
                                {"tome": {"ratio": 0.502}, "deepcache": {"cache_interval": 3}}) \
        .startswith("same tokens merged,")


PAB_SPEC = FLUX_SPEC.replace("steps = 12", "steps = 8").replace("limit = 35.0", "limit = 20.0") \
    .replace('[["steps"], ["magcache"], ["steps", "taylorseer"]]', '[["pab"]]') \
    .replace("n_trials = 6\nn_startup_trials = 6\nseed = 1", "n_trials = 20\nwarm_start = []") \
    + "[space.pab]\nspatial_attention_block_skip_range = [2, 3]\ntimestep_skip_high = [800, 1000]\n"


def test_check_counts_the_computations_a_worker_then_measures_through(tmp_path):
    """`check` counts the distinct computations of the space on this device (402 settings, far
    fewer computations), says n_trials asks for more, and estimates that many trials; a worker
    then measures exactly that many before it finds the space exhausted, and one that resumes the
    study, knowing the timesteps stored, counts what is left of them."""
    spec = write_spec(tmp_path / "pab.toml", PAB_SPEC)
    checked = optsearch_cmd("check", str(spec), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    [line] = [line for line in checked.stdout.splitlines() if line.startswith("space: ")]
    count = int(line.split()[1])
    assert 2 < count < 20
    assert (f"note: search.n_trials = 20 is more than the {count} distinct computations here: the "
            "study stops once each is measured (the space is exhausted)") in checked.stdout
    assert f"estimate: {count} trials x 4 prompts" in checked.stdout
    run = ("run", str(spec), "--storage", f"sqlite:///{tmp_path}/pab.db", "--quiet")
    assert optsearch_cmd(*run, "--n-trials", "1", cwd=tmp_path).returncode == 0  # stores the timesteps
    ran = optsearch_cmd(*run, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert f": {count - 1} trials to go; estimate: {count - 1} trials x" in ran.stdout  # resumed: told
    assert f"the space is exhausted: all {count} distinct computations are tried on cpu" in ran.stdout
    assert f"{count}/20 trials measured" in ran.stdout


def test_pab_and_fastercache_share_one_measurement_of_the_timesteps(tiny_clip):
    """A video study searches both: the second family adopts the first's timesteps (a plain call
    of a whole video is not run twice), and the evaluator stores each under its own name."""
    from optsearch.measure.evaluate import Evaluator
    from optsearch.measure.generation import GenerationConfig

    pipe = load_pipeline("builtin:tiny-wan", device="cpu", dtype="float32")
    config = GenerationConfig(steps=STEPS, guidance_scale=5.0, batch_size=1, seed=3, num_frames=9)
    stored = []
    evaluator = Evaluator(pipe, tiny_clip, ["a red cube"], config,
                          on_calibrated=lambda family, data: stored.append(family))
    calls = []
    counter = pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        evaluator.apply({"pab": {"spatial_attention_block_skip_range": 3}}).restore()
        measured_with = len(calls)
        evaluator.apply({"fastercache": {"spatial_attention_block_skip_range": 3}}).restore()
    finally:
        counter.remove()
    assert measured_with == 2 * STEPS and len(calls) == measured_with  # guidance: two calls a step
    assert stored == ["pab", "fastercache"]
    assert evaluator.calibration["fastercache"]["timesteps"] == evaluator.calibration["pab"]["timesteps"]
