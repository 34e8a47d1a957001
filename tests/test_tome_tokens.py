"""ToMe's ratios are known by the tokens they merge: tomesd merges `int(tokens * ratio)` at each
level, so neighbouring ratios are often one computation, measured once."""

import numpy as np

from optsearch.accelerators import AppliedSetting, canonical_setting, tome
from tests.conftest import TINY_SPEC, generate_images, optsearch_cmd, study_after_one_trial, write_spec

PROMPTS = ["a red bus on a street", "a cat on a sofa"]


def _key(calibration: dict, ratio: float, max_downsample: int = 1) -> dict:
    return canonical_setting({"tome": {"ratio": ratio, "max_downsample": max_downsample}}, 8,
                             {"tome": calibration})


def _next_ratio(calibration: dict, ratio: float, same: bool, max_downsample: int = 1) -> float:
    """The first ratio above `ratio` on a 0.001 grid whose key is (or is not) `ratio`'s."""
    key = _key(calibration, ratio, max_downsample)
    return next(r / 1000 for r in range(round(ratio * 1000) + 1, 1000)
                if (_key(calibration, r / 1000, max_downsample) == key) == same)


def test_ratios_that_merge_the_same_tokens_make_the_same_images(tiny_pipe):
    """The measured token counts are the ones tomesd merges from: two ratios of one key make
    bit-identical images, and the next ratio whose count differs by one token does not, at one
    level and at two; levels the UNet does not have change nothing."""
    calibration = tome.measure_tokens(tiny_pipe, lambda: generate_images(tiny_pipe, PROMPTS[:1], 2))
    assert calibration["latent_size"] == [16, 16]
    assert calibration["tokens"] == {"1": 256, "2": 64}  # two attention levels

    def images(ratio: float, max_downsample: int = 1) -> np.ndarray:
        setting = {"tome": {"ratio": ratio, "max_downsample": max_downsample, "use_rand": True}}
        with AppliedSetting(tiny_pipe, setting) as applied:
            return generate_images(applied, PROMPTS, steps=4, reseed=applied.reseed)

    for levels in (1, 2):
        twin = _next_ratio(calibration, 0.5, True, levels)
        other = _next_ratio(calibration, 0.5, False, levels)
        assert twin < other
        first = images(0.5, levels)
        assert np.array_equal(first, images(twin, levels)), (levels, twin)
        assert not np.array_equal(first, images(other, levels)), (levels, other)
    assert _key(calibration, 0.5, 2) == _key(calibration, 0.5, 8) != _key(calibration, 0.5, 1)
    assert np.array_equal(images(0.5, 2), images(0.5, 8))
    # without the counts (no measurement yet), a setting is compared as written
    assert canonical_setting({"tome": {"ratio": 0.5}}, 8, {}) == {"tome": {"ratio": 0.5}}


def test_a_ratio_that_merges_the_same_tokens_is_not_measured_again(tmp_path):
    """A worker measures the token counts once and stores them for the device; a later ratio
    that merges the same counts copies the earlier result (its timings, to the last digit) and
    keeps its own setting; one that merges another count is measured, and so is the unmeasured
    computation the worker queues in the copy's place."""
    spec = write_spec(tmp_path / "tome.toml", TINY_SPEC.replace(
        'accelerators = ["deepcache", "tome"]', 'accelerators = [["tome"]]\nwarm_start = []')
        .replace("n_trials = 4", "n_trials = 3") + "[space.tome]\nmax_downsample = 2\n")
    study, url, worker, key = study_after_one_trial(spec, "tiny", {"tome.ratio": 0.5}, "tome")
    calibration = study.user_attrs[key]
    assert calibration["tokens"] == {"1": 256, "2": 64}

    twin, other = _next_ratio(calibration, 0.5, True, 2), _next_ratio(calibration, 0.5, False, 2)
    study.enqueue_trial({"tome.ratio": twin})
    study.enqueue_trial({"tome.ratio": other})
    ran = optsearch_cmd(*worker)
    assert ran.returncode == 0, ran.stderr
    first, copy, measured, drawn = study.get_trials()  # the copy takes none of the 3 trials
    assert copy.user_attrs["reused_from"] == 0 and copy.values == first.values
    assert copy.user_attrs["setting"]["tome"]["ratio"] == twin
    assert copy.user_attrs["batch_seconds"] == first.user_attrs["batch_seconds"]
    assert "the result of trial 0 (same tokens merged, same device: the same computation)" in ran.stdout
    assert "reused_from" not in measured.user_attrs and measured.params["tome.ratio"] == other
    assert measured.user_attrs["calibration_used"]["tome"]["tokens"] == {"1": 256, "2": 64}
    shown = optsearch_cmd("study", "show", "tiny", "--storage", url).stdout
    assert "reused 1 (free copies" in shown and "tome tokens on " in shown
    assert ": 256 at 1x, 64 at 2x downsampling (measured;" in shown
    assert "reused_from" not in drawn.user_attrs and _key(calibration, drawn.params["tome.ratio"], 2) \
        not in (_key(calibration, 0.5, 2), _key(calibration, other, 2))


def test_the_tokens_of_a_compiled_unet_are_measured_without_recompiling_it():
    """The hooks that count tokens run with compiled code set aside (force_eager): the compiled
    UNet's blocks are neither recompiled for them nor after them."""
    import torch

    from optsearch.measure.compiling import compile_denoiser
    from optsearch.measure.models import load_pipeline

    pipe = load_pipeline("builtin:tiny", device="cpu", dtype="float32")
    compile_denoiser(pipe, "regional", backend="eager")
    generate_images(pipe, PROMPTS[:1], 2)  # compiles
    torch._dynamo.utils.counters.clear()
    calibration = tome.measure_tokens(pipe, lambda: generate_images(pipe, PROMPTS[:1], 2))
    generate_images(pipe, PROMPTS[:1], 2)
    assert calibration["tokens"] == {"1": 256, "2": 64}
    assert not torch._dynamo.utils.counters["frames"].get("total")  # no frame compiled again


XL_LIKE = '''
import torch

from optsearch.measure.builtin import _build_sd


def build(device, dtype):
    """SDXL's layout in miniature: no attention at the top level, attention at 2x."""
    torch.manual_seed(0)
    unet = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                attention_head_dim=8, norm_num_groups=32)
    pipe = _build_sd(unet, (32, 64), 32)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.eval()
    return pipe.to(device, dtype)
'''


def test_a_unet_without_attention_at_the_top_is_told_and_its_idle_tome_counted_as_such(tmp_path):
    """On a UNet whose first level has no attention (SDXL's layout), `max_downsample = 1` merges
    nothing: every ratio there is one computation, the baseline's very images, reported as
    computing everything (so a trial of it alone stops as inert); `check` and the worker say so,
    and where to search instead."""
    import torch

    namespace: dict = {}
    exec(XL_LIKE, namespace)
    pipe = namespace["build"](torch.device("cpu"), torch.float32)
    measured = tome.measure_tokens(pipe, lambda: generate_images(pipe, PROMPTS[:1], 2))
    assert measured["tokens"] == {"2": 64}
    assert _key(measured, 0.3) == _key(measured, 0.6) == {"tome": {"merged_tokens": {}}}
    assert tome.idle_max_downsample(measured, [1, 2, 4]) == [1]
    baseline = generate_images(pipe, PROMPTS, steps=4)
    for max_downsample, fraction in ((1, 1.0), (2, None)):
        setting = {"tome": {"ratio": 0.5, "max_downsample": max_downsample}}
        with AppliedSetting(pipe, setting, {"tome": measured}) as applied:
            images = generate_images(applied, PROMPTS, steps=4, reseed=applied.reseed)
            assert applied.computed_fraction() == fraction
        assert np.array_equal(images, baseline) == (max_downsample == 1)

    (tmp_path / "xl_like.py").write_text(XL_LIKE)
    spec = write_spec(tmp_path / "xl.toml", TINY_SPEC.replace('id = "builtin:tiny"', 'id = "xl_like:build"')
                      .replace('accelerators = ["deepcache", "tome"]', 'accelerators = [["tome"]]')
                      + "[space.tome]\nmax_downsample = [1, 4]\n")
    checked = optsearch_cmd("check", str(spec), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "tome: attention at 2x (64 tokens) downsampling on this UNet" in checked.stdout
    warning = ("warning: space.tome.max_downsample = 1 merges nothing here (the attention starts at "
               "2x downsampling): those trials time the baseline; search from 2")
    assert warning in checked.stdout
    ran = optsearch_cmd("run", str(spec), "--storage", f"sqlite:///{tmp_path}/xl.db", "--n-trials", "1",
                        "--quiet", cwd=tmp_path)  # a worker says it too, when it counts the tokens
    assert ran.returncode == 0, ran.stderr
    assert f": {warning}" in ran.stdout
