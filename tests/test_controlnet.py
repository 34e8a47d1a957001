"""ControlNet pipelines (Stable Diffusion's, FLUX's): each prompt's image is the control image,
the ControlNet runs beside the denoiser at every step, and the accelerators of the denoiser's kind
run on it; a hub id or folder is served with `[model] controlnet`."""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from PIL import Image

from optsearch.accelerators import apply_setting, magcache
from optsearch.deployment import ContextCheck, compiled_how
from optsearch.errors import ModelLoadError, PromptError, SpecError
from optsearch.measure.builtin import _trained_away, build_builtin
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


MULTI_SPEC = """
[model]
id = "{folder}"
controlnet = ["{canny}", "{depth}"]
kind = "unet"
device = "cpu"
steps = 6
height = 32
width = 32
[prompts]
source = "{refs}"
image_column = "images"
num_samples = 2
batch_size = 1
[quality]
clip_model = "builtin:tiny"
clip_pretrained = "none"
metric = "psnr"
limit = 20.0
[search]
accelerators = ["deepcache"]
"""


def saved_controlnets(tiny, folder) -> list[str]:
    """Two ControlNets of `tiny`'s UNet, with weights of their own (as a canny and a depth one)."""
    paths = []
    for seed, name in enumerate(("canny", "depth")):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(tiny.unet, conditioning_embedding_out_channels=(16, 32))
        with torch.no_grad():
            for parameter in controlnet.parameters():
                parameter.normal_(std=0.1) if parameter.dim() > 1 and not parameter.any() else None
        controlnet.save_pretrained(folder / name)
        paths.append(str(folder / name))
    return paths


def test_several_controlnets_each_take_their_own_control_image(tmp_path):
    """A list in `[model] controlnet` serves diffusers' multi-ControlNet: each prompt carries one
    control image for each (a list in the image column, in order), every net's image reaches the
    call, the UNet's families run on it, and each net gets a conditioning scale."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from tests.test_references import write_references

    tiny = build_builtin("builtin:tiny")
    StableDiffusionPipeline(**tiny.components).save_pretrained(tmp_path / "sd")
    canny, depth = saved_controlnets(tiny, tmp_path)
    text = MULTI_SPEC.format(folder=tmp_path / "sd", canny=canny, depth=depth,
                             refs=write_references(tmp_path / "refs"))
    spec = load_spec(write_spec(tmp_path / "multi.toml", text))
    assert spec.model.call["controlnet_conditioning_scale"] == [1.0, 1.0]  # one each, exported so
    pipe = pipeline_from_spec(spec)
    assert type(pipe.controlnet) is MultiControlNetModel and len(pipe.controlnet.nets) == 2
    prompts = load_prompts(spec.prompts.source, 1, image_column="images")
    assert call_inputs(prompts, pipe)["image"] == prompts[0].image
    config = GenerationConfig.from_spec(spec)
    images = partial(first_images, pipe, config, prompts)
    baseline = images()
    first, second = prompts[0].image
    for changed in ([first, first], [second, second]):  # either net's image changes the result
        other = [ConditionedPrompt(str(prompts[0]), changed)]
        assert not np.array_equal(first_images(pipe, config, other), baseline)
    assert_each_skips_and_restores(pipe, images, (
        {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}, PAB), baseline)
    with pytest.raises(PromptError, match="runs 2 ControlNets, each on its own control image, and "
                                          "'.*' carries 1: give each prompt 2 images"):
        check_conditioning(pipe, [ConditionedPrompt("one", first)], 1)
    # served with one number for both, as measured with [0.6, 0.6]: no warning; 0.5 warns
    served = ContextCheck({"call": {"controlnet_conditioning_scale": [0.6, 0.6]}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for scale in (0.6, [0.6, 0.6], 0.5):
            served(pipe, (), {"prompt": "a", "controlnet_conditioning_scale": scale})
    assert [str(w.message)[:99] for w in caught] == [
        "optsearch: this setting was measured at controlnet_conditioning_scale = [0.6, 0.6]; called "
        "with 0.5"]

    checked = optsearch_cmd("check", str(tmp_path / "multi.toml"), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert f"with ControlNets {canny}, {depth} on cpu" in checked.stdout
    assert "with 2 control images of 64x64, 96x64 px" in checked.stdout
    for change, says in (
            (("batch_size = 1", "batch_size = 2"), "prompts.batch_size: 2: several ControlNets"),
            (("[prompts]", "[model.call]\ncontrolnet_conditioning_scale = [1.0, 0.5, 0.5]\n[prompts]"),
             "gives 3 scales for 2 ControlNets"),
            ((f'"{depth}"]', "2]"), "model.controlnet: must be a ControlNet's hub id or folder, or a "
                                     "list of them")):
        with pytest.raises(SpecError, match=says):
            load_spec(write_spec(tmp_path / "bad.toml", text.replace(*change)))


def test_several_flux_controlnets_run_with_a_scale_each_and_the_caches_on_them(tmp_path):
    """FLUX's multi-ControlNet call fails on its default scale (a number, diffusers 0.42): each
    net is given one. Its residuals sum into the transformer's blocks, where the caches run."""
    from diffusers import FluxPipeline

    from optsearch.measure.models import load_pipeline

    tiny = build_builtin("builtin:tiny-flux-controlnet")
    FluxPipeline(**{name: component for name, component in tiny.components.items()
                    if name != "controlnet"}).save_pretrained(tmp_path / "flux")
    tiny.controlnet.save_pretrained(tmp_path / "depth")
    with torch.no_grad():
        for parameter in tiny.controlnet.parameters():
            parameter.mul_(-1)
    tiny.controlnet.save_pretrained(tmp_path / "canny")
    pipe = load_pipeline(str(tmp_path / "flux"), "cpu", "float32", kind="transformer",
                         controlnet=[str(tmp_path / "depth"), str(tmp_path / "canny")])
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.controlnet).__name__ == "FluxMultiControlNetModel"
    write_edits(tmp_path / "edits", count=2, metadata=True)
    one, two = load_prompts(str(tmp_path / "edits"), 2)
    prompts = [ConditionedPrompt("a watercolor", [one.image, two.image])]
    check_conditioning(pipe, prompts, 1)
    with pytest.raises(PromptError, match="runs 2 ControlNets, which take one prompt a call"):
        check_conditioning(pipe, prompts * 2, 2)
    config = GenerationConfig(steps=6, height=128, width=128, guidance_scale=3.5, batch_size=1)
    images = partial(first_images, pipe, config, prompts)
    baseline = images()
    assert not np.array_equal(first_images(pipe, config, [ConditionedPrompt(
        "a watercolor", [one.image, one.image])]), baseline)
    assert_each_skips_and_restores(pipe, lambda applied: images(applied), (
        {"fbcache": {"threshold": 0.5}},
        {"dbcache": {"residual_diff_threshold": 0.5, "max_warmup_steps": 1}}), baseline)


def test_several_sd3_controlnets_run_and_several_qwen_image_ones_are_one_line():
    """SD3's multi-ControlNet call fails on its default scale too (each net is given one);
    Qwen-Image's multi model takes a single union ControlNet only: several are refused before
    any is loaded."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    from optsearch.measure.models import with_controlnet

    sd3 = build_builtin("builtin:tiny-sd3")
    nets = []
    for seed in range(2):
        torch.manual_seed(seed)
        nets.append(_trained_away(SD3ControlNetModel(
            sample_size=16, patch_size=1, in_channels=16, out_channels=16, num_layers=1,
            attention_head_dim=32, num_attention_heads=4, caption_projection_dim=128,
            joint_attention_dim=64, pooled_projection_dim=64)))
    parts = {name: part for name, part in sd3.components.items()
             if name not in ("image_encoder", "feature_extractor")}
    pipe = StableDiffusion3ControlNetPipeline(controlnet=nets, **parts)
    pipe.set_progress_bar_config(disable=True)
    red, blue = (Image.new("RGB", (128, 128), color) for color in ((200, 40, 40), (40, 40, 200)))
    config = GenerationConfig(steps=4, height=128, width=128, guidance_scale=1.0, batch_size=1)
    both = first_images(pipe, config, [ConditionedPrompt("a cube", [red, blue])])
    assert not np.array_equal(first_images(pipe, config, [ConditionedPrompt("a cube", [red, red])]), both)
    with pytest.raises(ModelLoadError, match="model.controlnet: diffusers runs one "
                                             "QwenImageControlNetModel at a time"):
        with_controlnet(build_builtin("builtin:tiny-qwen-image"), ["a/b", "c/d"], torch.float32)
