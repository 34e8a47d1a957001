"""Image-to-image at a strength (`[model] strength`): the call denoises a share of its steps, and
every count of steps (step-counted parameters, MagCache's config, cache-dit's masks, the export)
counts those, by the pipeline's own rounding; the strength is deployment context."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline

import optsearch
from optsearch.accelerators import (
    apply_setting,
    call_steps,
    canonical_setting,
    denoised_steps,
    denoiser,
    magcache,
    max_speedup,
)
from optsearch.errors import ModelLoadError, PromptError, SpecError
from optsearch.measure.builtin import build_builtin
from optsearch.measure.evaluate import evaluator_from_spec
from optsearch.measure.generation import GenerationConfig, check_conditioning
from optsearch.measure.prompts import load_prompts
from optsearch.measure.served import pipeline_from_spec
from optsearch.optimize.deploy import diffusers_python
from optsearch.optimize.export import export_study
from optsearch.optimize.study import load_study
from optsearch.storage.rdb import open_storage
from optsearch.study_spec import load_spec
from optsearch.study_spec.schema import ModelSpec
from tests.conftest import optsearch_cmd, write_spec
from tests.test_deploy_exports import export, exported_function, study_with_winner
from tests.test_image_conditioned import EDITS_FOLDER_SPEC, first_images, quiet_builtin, write_edits

FLUX_I2I_SPEC = """
name = "i2i"
[model]
id = "builtin:tiny-flux-img2img"
device = "cpu"
steps = 16
strength = 0.55
height = 128
width = 128
guidance_scale = 3.5
""" + EDITS_FOLDER_SPEC + """[search]
accelerators = [["magcache"], ["dbcache"]]
"""


@pytest.fixture(scope="module")
def flux_i2i():
    return quiet_builtin("builtin:tiny-flux-img2img")


def exported_dict(url: str, name: str) -> dict:
    """What `study export` writes as search_params.json, and `optsearch.apply` takes."""
    return export_study(*load_study(open_storage(url, heartbeat_interval=None), name))


def denoiser_calls(pipe, run) -> int:
    """How many times `run()` called the pipeline's denoiser."""
    calls = []
    handle = denoiser(pipe).register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        run()
    finally:
        handle.remove()
    return len(calls)


def test_a_strength_denoises_the_pipelines_own_share_of_the_steps(tmp_path, flux_i2i):
    write_edits(tmp_path / "edits", count=2, metadata=True)
    prompts = load_prompts(str(tmp_path / "edits"), 2)
    config = GenerationConfig(steps=16, height=128, width=128, guidance_scale=3.5, batch_size=2,
                              strength=0.55)
    # 16 x 0.55 = 8.8: Stable Diffusion's pipelines denoise int(8.8) = 8 steps, FLUX's skip
    # int(16 - 8.8) = 7 of them and denoise 9; the loaded pipeline's own rounding is counted
    assert denoised_steps(16, 0.55) == 8 and denoised_steps(16, None) == 16
    assert call_steps(flux_i2i, {"num_inference_steps": 16, "strength": 0.55}) == 9
    assert denoiser_calls(flux_i2i, lambda: first_images(flux_i2i, config, prompts)) == 9
    sd = quiet_builtin("builtin:tiny-sd-img2img")
    assert call_steps(sd, {"num_inference_steps": 16, "strength": 0.55}) == 8
    assert call_steps(build_builtin("builtin:tiny"), {"num_inference_steps": 16, "strength": 0.5}) == 16
    # fewer steps: 13 at 0.55 denoise 8 of FLUX's 9, the share its plausibility bound allows for
    fewer = apply_setting(flux_i2i, {"steps": {"num_inference_steps": 13}})
    try:
        assert denoiser_calls(flux_i2i, lambda: first_images(flux_i2i, config, prompts, fewer)) == 8
        assert fewer.computed_fraction() == pytest.approx(8 / 9)
    finally:
        fewer.restore()
    assert max_speedup({"steps": {"num_inference_steps": 13}}, 16, 0.55) == pytest.approx(9 / 7)
    # a short call (warm-up, calibration) needs more steps to denoise as many
    assert config.steps_denoising(3) == 6 and GenerationConfig(steps=16).steps_denoising(3) == 3
    # the strength reaches the call: another one denoises another share of the image
    other = GenerationConfig(**{**config.__dict__, "strength": 0.9})
    assert not np.array_equal(first_images(flux_i2i, other, prompts),
                              first_images(flux_i2i, config, prompts))


def test_magcache_is_measured_and_served_over_the_steps_that_denoise(tmp_path, flux_i2i):
    """MagCache's config counts steps: at 16 steps a strength of 0.55 runs 9. Configured for 16,
    diffusers resets its state only after 16 steps, so a served pipeline's second call went on
    from the first one's state."""
    texts = write_edits(tmp_path / "edits", count=2, metadata=True)
    spec = load_spec(write_spec(tmp_path / "i2i.toml", FLUX_I2I_SPEC))
    evaluator = evaluator_from_spec(spec, pipe=flux_i2i, prompts=load_prompts(str(tmp_path / "edits"), 2))
    setting = {"magcache": {"threshold": 0.5, "max_skip_steps": 2, "retention_ratio": 0.2}}
    applied = evaluator.apply(setting)
    try:
        assert len(evaluator.calibration["magcache"]["mag_ratios"]) == 9
        first_images(flux_i2i, evaluator.config, evaluator.prompts, applied)
        assert applied.computed_fraction() < 1
        ran_with = applied.ran_with()
    finally:
        applied.restore()
    assert ran_with == {"magcache": {"denoising_steps": 9}}
    # which steps a trial of fewer steps skips is replayed over those it denoises: 13 at 0.55
    # denoise 8 on FLUX (7 by SD's rounding), what a copied twin must compute alike
    fewer = {"steps": {"num_inference_steps": 13}, **setting}
    computed = canonical_setting(fewer, 16, evaluator.calibration, evaluator.denoising_steps_of)
    ratios = evaluator.calibration["magcache"]
    assert computed["magcache"] == magcache.computation(setting["magcache"], 8, ratios)
    assert computed["magcache"] != magcache.computation(setting["magcache"], 7, ratios)

    calibration = {"magcache": {**evaluator.calibration["magcache"], **ran_with["magcache"]}}
    url = study_with_winner(tmp_path, FLUX_I2I_SPEC, setting, calibration_used=calibration)
    text = export(tmp_path, url, "i2i", "diffusers", "accelerate_pipe.py")
    assert "STRENGTH = 0.55" in text and "num_inference_steps=9," in text
    accelerate = exported_function(text)
    inputs = [prompt.image for prompt in evaluator.prompts]

    def plain() -> FluxImg2ImgPipeline:  # the class users load, not the builtin's
        pipe = FluxImg2ImgPipeline(**flux_i2i.components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def images(call, **kwargs) -> np.ndarray:
        return call(prompt=list(evaluator.prompts), image=inputs, height=128, width=128,
                    guidance_scale=3.5, max_sequence_length=32,
                    generator=[torch.Generator("cpu").manual_seed(i) for i in range(2)],
                    output_type="np", **{"num_inference_steps": 16, "strength": 0.55, **kwargs}).images

    assert texts == list(evaluator.prompts)
    with optsearch.apply(plain(), exported_dict(url, "i2i")) as run:  # as measured, in optsearch
        expected = images(run)
    pipe = plain()
    call_kwargs = accelerate(pipe)
    assert call_kwargs == {"num_inference_steps": 16, "strength": 0.55}
    served = [images(pipe, **call_kwargs) for _ in range(2)]
    pipe.transformer.disable_cache()  # the module's pipeline shares it
    np.testing.assert_array_equal(served[0], expected)
    np.testing.assert_array_equal(served[1], expected)  # the second call starts afresh
    assert not np.array_equal(expected, images(plain()))  # MagCache did skip


def test_cache_dit_masks_count_the_steps_that_denoise(tmp_path, flux_i2i):
    write_edits(tmp_path / "edits", count=2, metadata=True)
    prompts = load_prompts(str(tmp_path / "edits"), 2)
    config = GenerationConfig(steps=16, height=128, width=128, guidance_scale=3.5, batch_size=2,
                              strength=0.55)
    setting = {"dbcache": {"residual_diff_threshold": 0.5, "max_warmup_steps": 1,
                           "steps_computation_mask": "fast", "steps_computation_policy": "static"}}
    applied = apply_setting(flux_i2i, setting)
    try:
        first_images(flux_i2i, config, prompts, applied)
        assert applied.ran_with() == {"dbcache": {"denoising_steps": 9}}
        assert applied.computed_fraction() < 1
    finally:
        applied.restore()
    url = study_with_winner(tmp_path, FLUX_I2I_SPEC, setting,
                            calibration_used={"dbcache": {"denoising_steps": 9}})
    text = export(tmp_path, url, "i2i", "cache-dit", "cache.yaml")
    assert "num_inference_steps: 9" in text  # the mask's steps, not the call's 16
    assert "num_inference_steps=16, strength=0.55" in text


def test_a_spec_counts_the_steps_that_denoise_as_its_pipeline_does(flux_i2i):
    """FLUX's image-to-image pipelines round the steps that denoise up and Stable Diffusion's
    down; a spec counts them before any pipeline loads (its ranges, masks and the "auto" ranges
    looked up per trial), by its model's kind. A FLUX spec counted SD's: one step short."""
    sd = quiet_builtin("builtin:tiny-sd-img2img")
    differ = 0
    for model_id, pipe in (("builtin:tiny-flux-img2img", flux_i2i), ("builtin:tiny-sd-img2img", sd)):
        for steps in (4, 10, 16, 28, 50):
            for strength in (0.1, 0.3, 0.55, 0.6, 0.75, 0.9, 1.0):
                model = ModelSpec(id=model_id, steps=steps, strength=strength)
                ran = call_steps(pipe, {"num_inference_steps": steps, "strength": strength})
                assert model.denoising_steps == ran, (model_id, steps, strength)
                differ += ran != denoised_steps(steps, strength)
    assert differ >= 10  # FLUX's count is not SD's at most of these (10 x 0.3 too: float rounding)
    assert ModelSpec(id="builtin:tiny-flux", steps=16).denoising_steps == 16


def test_a_spec_states_its_strength_and_the_pipeline_must_take_it(tmp_path):
    spec = FLUX_I2I_SPEC
    # (FLUX denoises one step of 16 at 0.05; Stable Diffusion none)
    sd = spec.replace("tiny-flux-img2img", "tiny-sd-img2img")
    for text, wrong, says in ((spec, 'strength = 1.5', "model.strength: 1.5 must be in (0, 1]"),
                              (sd, 'strength = 0.05', "0.05 of model.steps=16 denoises no step")):
        with pytest.raises(SpecError, match=rf"{says.replace('(', '.').replace(')', '.')}"):
            load_spec(write_spec(tmp_path / "bad.toml", text.replace("strength = 0.55", wrong)))
    # a step-counted parameter counts the steps that denoise: 9 of 16 at 0.55 (FLUX's rounding)
    taylor = spec.replace("tiny-flux-img2img", "tiny-flux").replace(
        '[["magcache"], ["dbcache"]]',
        '["taylorseer"]\n[space.taylorseer]\ndisable_cache_before_step = [1, 12]')
    with pytest.raises(SpecError, match=r"\[1, 12\] goes past 9 denoising steps \(model.steps=16 at "
                                        r"strength 0.55\)"):
        load_spec(write_spec(tmp_path / "bad.toml", taylor))

    write_edits(tmp_path / "edits", count=2, metadata=True)
    load_spec(write_spec(tmp_path / "nine.toml", taylor.replace("[1, 12]", "[1, 9]")))  # all 9 run
    load_spec(write_spec(tmp_path / "one.toml", spec.replace("strength = 0.55", "strength = 0.05")))
    # a strength the pipeline does not take; an image-to-image pipeline whose default strength
    # would be counted silently; text prompts to it: each one line
    kontext = spec.replace("tiny-flux-img2img", "tiny-flux-kontext")
    with pytest.raises(ModelLoadError, match="model.strength applies to image-to-image pipelines; "
                                             "FluxKontextShortPromptPipeline takes none"):
        pipeline_from_spec(load_spec(write_spec(tmp_path / "kontext.toml", kontext)))
    with pytest.raises(PromptError, match="takes an image with each prompt: set prompts.image_column"):
        check_conditioning(build_builtin("builtin:tiny-flux-img2img"), ["a text prompt"])
    result = optsearch_cmd("check", str(write_spec(tmp_path / "bad.toml", spec.replace(
        "strength = 0.55\n", ""))), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "FluxImg2ImgShortPromptPipeline denoises a share of its steps (strength 0.6 by default): " \
           "set model.strength" in result.stderr


SD_I2I_SPEC = """
name = "sd-i2i"
[model]
id = "builtin:tiny-sd-img2img"
device = "cpu"
steps = 10
strength = 0.6
height = 32
width = 32
""" + EDITS_FOLDER_SPEC + """[search]
accelerators = ["deepcache"]
n_trials = 2
n_startup_trials = 2
seed = 1
"""


def test_image_to_image_from_the_command_line_and_served_at_another_strength(tmp_path):
    write_edits(tmp_path / "edits", count=2, size=32, metadata=True)
    spec = write_spec(tmp_path / "sd.toml", SD_I2I_SPEC)
    url = f"sqlite:///{tmp_path / 'run.db'}"
    result = optsearch_cmd("run", str(spec), "--storage", url, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study, _ = load_study(open_storage(url, heartbeat_interval=None), "sd-i2i")
    measured = [trial.user_attrs for trial in study.trials if trial.state.name == "COMPLETE"]
    assert len(measured) == 2 and all(attrs["psnr"] > 10 for attrs in measured)
    # 6 of its 10 steps denoise: DeepCache's interval (default range 2-8) is fitted to them
    assert all(2 <= attrs["setting"]["deepcache"]["cache_interval"] <= 6 for attrs in measured)
    result = optsearch_cmd("check", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "10 steps (6 of them denoise, at strength 0.6)" in result.stdout
    assert "batch 2, 32x32, 10 steps at strength 0.6" in result.stdout

    exported = exported_dict(url, "sd-i2i")
    text = diffusers_python(exported)
    assert "STRENGTH = 0.6  #" in text and "'strength': STRENGTH" in text
    assert exported["deployment"]["strength"] == 0.6
    pipe = quiet_builtin("builtin:tiny-sd-img2img")
    image = load_prompts(str(tmp_path / "edits"), 1)[0].image
    with optsearch.apply(pipe, exported) as run, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(prompt="a", image=image, num_inference_steps=10, strength=0.6, height=32, width=32)
        assert not [w for w in caught if "strength" in str(w.message)]
        run(prompt="a", image=image, num_inference_steps=10, strength=0.9, height=32, width=32)
    said = [str(w.message) for w in caught if "strength" in str(w.message)]
    assert said == ["optsearch: this setting was measured at strength = 0.6; called with 0.9, its "
                    "speedup and quality may differ (search again at strength = 0.9 to know)"]


def test_a_text_to_image_folder_loads_as_its_image_to_image_pipeline_at_a_strength(tmp_path):
    """FLUX.1 [dev] and SD 1.5 publish text-to-image pipelines: a spec with a strength loads
    their image-to-image pipeline on the same components (diffusers' from_pipe)."""
    from diffusers import FluxPipeline

    write_edits(tmp_path / "edits", count=2, metadata=True)
    FluxPipeline(**build_builtin("builtin:tiny-flux").components).save_pretrained(tmp_path / "flux")
    text = FLUX_I2I_SPEC.replace('"builtin:tiny-flux-img2img"',
                                 f'"{tmp_path / "flux"}"\nkind = "transformer"')
    pipe = pipeline_from_spec(load_spec(write_spec(tmp_path / "folder.toml", text)))
    assert type(pipe) is FluxImg2ImgPipeline
    assert call_steps(pipe, {"num_inference_steps": 16, "strength": 0.55}) == 9
    plain = pipeline_from_spec(load_spec(write_spec(tmp_path / "plain.toml", text.replace(
        "strength = 0.55\n", "").replace('[["magcache"], ["dbcache"]]', '["magcache"]'))))
    assert type(plain) is FluxPipeline  # no strength: the pipeline as published


def test_an_image_to_image_folder_loads_as_published_and_needs_its_strength(tmp_path):
    """SDXL's refiner is published as an image-to-image pipeline (no first text encoder, strength
    0.3 by default): it loads as itself, and a spec without a strength is one line."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    xl = build_builtin("builtin:tiny-xl").components
    StableDiffusionXLImg2ImgPipeline(
        vae=xl["vae"], text_encoder=None, text_encoder_2=xl["text_encoder_2"], tokenizer=None,
        tokenizer_2=xl["tokenizer_2"], unet=xl["unet"], scheduler=xl["scheduler"],
        requires_aesthetics_score=True).save_pretrained(tmp_path / "refiner")
    write_edits(tmp_path / "edits", count=2, size=64, metadata=True)
    # the size first: the folder's own path may hold a "32" (pytest-32)
    text = SD_I2I_SPEC.replace("32", "64").replace("strength = 0.6", "strength = 0.3") \
        .replace('"builtin:tiny-sd-img2img"', f'"{tmp_path / "refiner"}"\nkind = "unet"')
    pipe = pipeline_from_spec(load_spec(write_spec(tmp_path / "refiner.toml", text)))
    assert type(pipe) is StableDiffusionXLImg2ImgPipeline and pipe.text_encoder is None
    assert call_steps(pipe, {"num_inference_steps": 10, "strength": 0.3}) == 3
    with pytest.raises(ModelLoadError, match="StableDiffusionXLImg2ImgPipeline denoises a share of its "
                                             r"steps \(strength 0.3 by default\)"):
        pipeline_from_spec(load_spec(write_spec(tmp_path / "none.toml",
                                                text.replace("strength = 0.3\n", ""))))
