"""ControlNet pipelines (Stable Diffusion's, FLUX's): each prompt's image is the control image,
the ControlNet runs beside the denoiser at every step, and the accelerators of the denoiser's kind
run on it; a hub id or folder is served with `[model] controlnet`."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

from optsearch.accelerators import apply_setting, magcache
from optsearch.deployment import compiled_how
from optsearch.errors import ModelLoadError, PromptError, SpecError
from optsearch.measure.builtin import build_builtin
from optsearch.measure.compiling import compile_denoiser
from optsearch.measure.generation import GenerationConfig, call_inputs, check_conditioning
from optsearch.measure.prompts import ConditionedPrompt, load_prompts
from optsearch.measure.served import pipeline_from_spec
from optsearch.optimize.deploy import diffusers_python
from optsearch.study_spec import load_spec
from tests.conftest import optsearch_cmd, write_spec
from tests.test_deploy_exports import exported_function
from tests.test_image_conditioned import (
    EDITS_FOLDER_SPEC,
    assert_each_skips_and_restores,
    first_images,
    quiet_builtin,
    write_edits,
)

PAB = {"pab": {"spatial_attention_block_skip_range": 2, "timestep_skip_low": 100,
               "timestep_skip_high": 900}}


def swapped(prompts) -> list[ConditionedPrompt]:
    """The same texts, each with the other's control image."""
    return [ConditionedPrompt(str(prompt), other.image)
            for prompt, other in zip(prompts, reversed(prompts), strict=True)]


def test_sd_controlnet_takes_each_prompts_control_image_and_its_families_run(tmp_path):
    pipe = quiet_builtin("builtin:tiny-sd-controlnet")
    write_edits(tmp_path / "edits", count=2, size=32, metadata=True)
    prompts = load_prompts(str(tmp_path / "edits"), 2)
    check_conditioning(pipe, prompts, 2)
    assert call_inputs(prompts, pipe)["image"] == [p.image for p in prompts]
    config = GenerationConfig(steps=10, height=32, width=32, guidance_scale=7.5, batch_size=2)
    images = partial(first_images, pipe, config, prompts)
    baseline = images()
    assert not np.array_equal(first_images(pipe, config, swapped(prompts)), baseline)
    assert_each_skips_and_restores(pipe, images, (
        {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}},
        {"tome": {"ratio": 0.5, "max_downsample": 1}}, PAB), baseline)
    with pytest.raises(ValueError, match="tgate runs its own text-to-image loop"):
        apply_setting(pipe, {"tgate": {"gate_step": 3}})


def test_flux_controlnet_runs_every_cache_with_the_controlnets_residuals(tmp_path):
    pipe = quiet_builtin("builtin:tiny-flux-controlnet")
    write_edits(tmp_path / "edits", count=2, metadata=True)
    prompts = load_prompts(str(tmp_path / "edits"), 2)
    assert call_inputs(prompts, pipe)["control_image"] == [p.image for p in prompts]
    config = GenerationConfig(steps=8, height=128, width=128, guidance_scale=3.5, batch_size=2)
    images = partial(first_images, pipe, config, prompts)
    baseline = images()
    assert not np.array_equal(first_images(pipe, config, swapped(prompts)), baseline)
    ratios = magcache.measure(pipe, 8, images)
    settings = ({"fbcache": {"threshold": 0.5}},
                {"taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2}}, PAB,
                {"dbcache": {"residual_diff_threshold": 0.5, "max_warmup_steps": 1}})
    assert_each_skips_and_restores(pipe, lambda applied: images(applied), settings, baseline)
    applied = apply_setting(pipe, {"magcache": {"threshold": 0.5}}, {"magcache": ratios})
    try:
        assert not np.array_equal(images(applied), baseline) and applied.computed_fraction() < 1
    finally:
        applied.restore()
    np.testing.assert_array_equal(images(), baseline)


CONTROLNET_SPEC = """
[model]
id = "{folder}"
controlnet = "{controlnet}"
kind = "unet"
device = "cpu"
steps = 6
height = 32
width = 32
""" + EDITS_FOLDER_SPEC + """[search]
accelerators = ["deepcache"]
"""


def test_a_folder_is_served_with_the_controlnet_the_spec_names(tmp_path):
    tiny = build_builtin("builtin:tiny")
    StableDiffusionPipeline(**tiny.components).save_pretrained(tmp_path / "sd")
    ControlNetModel.from_unet(tiny.unet, conditioning_embedding_out_channels=(16, 32)).save_pretrained(
        tmp_path / "canny")
    write_edits(tmp_path / "edits", count=2, size=32, metadata=True)
    text = CONTROLNET_SPEC.format(folder=tmp_path / "sd", controlnet=tmp_path / "canny")
    spec = write_spec(tmp_path / "cn.toml", text)
    pipe = pipeline_from_spec(load_spec(spec))
    assert type(pipe) is StableDiffusionControlNetPipeline and pipe.unet is not None
    result = optsearch_cmd("check", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"model {tmp_path / 'sd'} with ControlNet {tmp_path / 'canny'} on cpu" in result.stdout

    missing = write_spec(tmp_path / "missing.toml", text.replace("canny", "nowhere"))
    with pytest.raises(ModelLoadError, match=r"model.controlnet folder '.*nowhere' does not exist"):
        pipeline_from_spec(load_spec(missing))
    for change, says in (
            ((f'"{tmp_path / "sd"}"', '"builtin:tiny-sd-controlnet"'),
             "model.controlnet: applies to a hub id or folder; 'builtin:tiny-sd-controlnet' builds its own"),
            (("steps = 6\n", "steps = 6\nstrength = 0.5\n"),
             "model.controlnet: with model.strength is not covered")):
        with pytest.raises(SpecError, match=says):
            load_spec(write_spec(tmp_path / "bad.toml", text.replace(*change)))


def test_a_flux_folder_is_served_with_a_flux_controlnet(tmp_path):
    """The ControlNet's class follows the denoiser's (FLUX's transformer: FluxControlNetModel)."""
    from diffusers import FluxControlNetPipeline, FluxPipeline

    from optsearch.measure.models import load_pipeline

    tiny = build_builtin("builtin:tiny-flux-controlnet")
    FluxPipeline(**{name: component for name, component in tiny.components.items()
                    if name != "controlnet"}).save_pretrained(tmp_path / "flux")
    tiny.controlnet.save_pretrained(tmp_path / "depth")
    pipe = load_pipeline(str(tmp_path / "flux"), "cpu", "float32", kind="transformer",
                         controlnet=str(tmp_path / "depth"))
    assert type(pipe) is FluxControlNetPipeline and type(pipe.controlnet).__name__ == "FluxControlNetModel"
    with pytest.raises(ModelLoadError, match="cannot load model.controlnet .* as a FluxControlNetModel"):
        load_pipeline(str(tmp_path / "flux"), "cpu", "float32", kind="transformer",
                      controlnet=str(tmp_path / "flux"))  # a pipeline's folder, not a ControlNet's


def test_a_pipeline_that_takes_an_image_and_a_control_image_is_one_line(tmp_path):
    """FLUX Control image-to-image takes the image to start from and a control image: a prompt
    carries one, and the call failed deep in the pipeline for the other."""
    from diffusers import FluxControlImg2ImgPipeline

    pipe = FluxControlImg2ImgPipeline(**build_builtin("builtin:tiny-flux-control").components)
    write_edits(tmp_path / "edits", count=2, metadata=True)
    with pytest.raises(PromptError, match="FluxControlImg2ImgPipeline takes an image and a control "
                                          "image with each prompt .*: not covered"):
        check_conditioning(pipe, load_prompts(str(tmp_path / "edits"), 2), 2)


@pytest.mark.parametrize("model_id, how", [("builtin:tiny-sd-controlnet", "regional"),
                                           ("builtin:tiny-flux-controlnet", "full")])
def test_a_compiled_pipeline_serves_its_controlnet_compiled_and_so_does_its_export(tmp_path, model_id,
                                                                                   how):
    """The ControlNet runs beside the denoiser at every step: left eager under a compiled denoiser,
    part of each step was timed slower than the server runs it. It is compiled as the denoiser is
    ("regional": the blocks it copied from the denoiser), and the Python export does the same."""
    def compiled_blocks(controlnet) -> set[str]:
        return {type(m).__name__ for m in controlnet.modules()
                if getattr(m, "_compiled_call_impl", None) is not None}

    pipe = quiet_builtin(model_id)
    blocks = set(pipe.unet._repeated_blocks if model_id.endswith("sd-controlnet")
                 else pipe.transformer._repeated_blocks)
    assert compiled_how(pipe.controlnet) == "none"
    compile_denoiser(pipe, how, backend="eager")
    assert compiled_how(pipe.controlnet) == how
    if how == "regional":  # the denoiser's block classes, and only those
        copied = {type(m).__name__ for m in pipe.controlnet.modules()} & blocks
        assert compiled_blocks(pipe.controlnet) == copied != set()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    write_edits(tmp_path / "edits", count=1, size=32, metadata=True)
    first_images(pipe, GenerationConfig(steps=2, height=32, width=32, batch_size=1),
                 load_prompts(str(tmp_path / "edits"), 1))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the call ran compiled

    exported = {"study": "cn", "metric": "psnr", "spec": {"model": {
        "steps": 2, "compile": how, "compile_backend": "eager"}}, "deployment": {"compile": how},
        "best": {"trial": 0, "setting": {"steps": {"num_inference_steps": 2}}, "confirmed": None,
                 "metrics": {"speedup": 1.5, "speedup_low": 1.4, "speedup_high": 1.6,
                             "psnr": 30.0, "psnr_low": 29.0, "psnr_high": 31.0}}}
    fresh = quiet_builtin(model_id)
    exported_function(diffusers_python(exported))(fresh)
    assert compiled_how(fresh.controlnet) == how
    assert compiled_blocks(fresh.controlnet) == compiled_blocks(pipe.controlnet)
