"""Inpainting pipelines (FLUX Fill, Stable Diffusion inpainting) take an image and a mask with each
prompt: from a folder whose metadata.jsonl gives mask_file_name, or a prompt file's mask column.
The accelerators that can run on them do, and the one that cannot (T-GATE) is refused in one line."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
from PIL import Image, ImageDraw

import optsearch
from optsearch.accelerators import apply_setting
from optsearch.errors import PromptError, SpecError
from optsearch.measure.builtin import build_builtin
from optsearch.measure.generation import GenerationConfig, call_inputs, check_conditioning
from optsearch.measure.prompts import ConditionedPrompt, load_prompts
from optsearch.study_spec import load_spec
from tests.conftest import optsearch_cmd, write_spec
from tests.test_deploy_exports import export, exported_function, study_with_winner
from tests.test_image_conditioned import assert_each_skips_and_restores, first_images, quiet_builtin

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def mask_of(size: int, box: tuple[float, float, float, float]) -> Image.Image:
    """White (to fill) inside `box`, given as fractions of the side."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle([round(f * size) for f in box], fill=255)
    return mask


def write_fills(folder, count: int = 4, size: int = 128, metadata: bool = True) -> list[str]:
    """`count` solid images (image i of color i), each with a mask of its left i+1 eighths, and
    their prompts: the folder's metadata.jsonl, or a jsonl beside it with image and mask columns."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = [f"paint a window in picture {i}" for i in range(count)]
    rows = []
    for i, text in enumerate(texts):
        Image.new("RGB", (size, size), COLORS[i % len(COLORS)]).save(folder / f"img{i}.png")
        mask_of(size, (0, 0, (i + 1) / 8, 1)).save(folder / f"mask{i}.png")
        rows.append({"file_name": f"img{i}.png", "mask_file_name": f"mask{i}.png", "prompt": text}
                    if metadata else {"prompt": text, "picture": f"{folder.name}/img{i}.png",
                                      "hole": f"{folder.name}/mask{i}.png"})
    target = folder / "metadata.jsonl" if metadata else folder.parent / f"{folder.name}.jsonl"
    target.write_text("\n".join(json.dumps(row) for row in rows))
    return texts


def filled_share(prompt) -> float:
    return np.asarray(prompt.mask).mean() / 255


def test_a_folder_and_a_file_give_each_prompt_its_image_and_its_own_mask(tmp_path):
    texts = write_fills(tmp_path / "fills")
    prompts = load_prompts(str(tmp_path / "fills"), 4, seed=1, shuffle=True)
    assert sorted(prompts) == sorted(texts) and prompts != texts  # shuffled, all there
    for prompt in prompts:  # each text kept its own image and mask through the shuffle
        i = texts.index(prompt)
        assert prompt.image.getpixel((0, 0)) == COLORS[i] and prompt.mask.mode == "L"
        assert filled_share(prompt) == pytest.approx((i + 1) / 8, abs=0.01)

    texts = write_fills(tmp_path / "holes", metadata=False)
    source = str(tmp_path / "holes.jsonl")
    prompts = load_prompts(source, 3, image_column="picture", mask_column="hole")
    assert list(prompts) == texts[:3] and [round(filled_share(p) * 8) for p in prompts] == [1, 2, 3]
    with pytest.raises(PromptError, match="no mask column 'gap'"):
        load_prompts(source, 2, image_column="picture", mask_column="gap")
    with pytest.raises(PromptError, match="prompts.mask_column needs prompts.image_column"):
        load_prompts(source, 2, mask_column="hole")
    # an image without its mask is one line, not a call that fails deep in the pipeline
    rows = [json.loads(line) for line in (tmp_path / "holes.jsonl").read_text().splitlines()]
    rows[1]["hole"] = None
    (tmp_path / "holes.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(PromptError, match="'paint a window in picture 1' has an image but no mask"):
        load_prompts(source, 2, image_column="picture", mask_column="hole")


def test_a_spec_names_masks_only_where_images_are(tmp_path):
    model = '[model]\nid = "builtin:tiny-flux-fill"\n[search]\naccelerators = ["fbcache"]\n'
    bad = tmp_path / "bad.toml"
    with pytest.raises(SpecError, match="prompts.mask_column: prompt set 'builtin' holds no masks"):
        load_spec(write_spec(bad, model + '[prompts]\nsource = "builtin"\nmask_column = "mask"\n'))
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "mask": "m.png"}\n')
    with pytest.raises(SpecError, match="prompts.mask_column: needs prompts.image_column"):
        load_spec(write_spec(bad, model + '[prompts]\nsource = "p.jsonl"\nmask_column = "mask"\n'))


@pytest.fixture(scope="module")
def fill():
    return quiet_builtin("builtin:tiny-flux-fill")


def test_flux_fill_fills_the_masked_region_and_the_caches_run_on_it(tmp_path, fill):
    texts = write_fills(tmp_path / "fills", count=2)
    prompts = load_prompts(str(tmp_path / "fills"), 2)
    other_masks = [ConditionedPrompt(text, prompt.image, mask_of(128, (0.5, 0, 1, 1)))
                   for text, prompt in zip(texts, prompts, strict=True)]
    config = GenerationConfig(steps=8, height=128, width=128, guidance_scale=30.0, batch_size=2)
    images = partial(first_images, fill, config)

    inputs = call_inputs(prompts, fill)
    assert inputs["image"] == [p.image for p in prompts] and inputs["mask_image"] == [p.mask for p in prompts]
    assert call_inputs(prompts[:1], fill)["mask_image"] is prompts[0].mask  # one alone, as pipelines take it
    baseline = images(prompts)
    assert baseline.shape == (2, 128, 128, 3)
    assert not np.array_equal(images(other_masks), baseline)  # the masks reach the call
    # FLUX Fill's loop names no cache context (optsearch names each call) and passes its
    # transformer timestep / 1000 with no current timestep of its own: PAB's window read it as
    # below 1 and never broadcast, until the probe put it on the 0-1000 scale
    assert_each_skips_and_restores(fill, lambda applied: images(prompts, applied), (
        {"fbcache": {"threshold": 0.5}},
        {"taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2}},
        {"pab": {"spatial_attention_block_skip_range": 2, "timestep_skip_low": 100,
                 "timestep_skip_high": 900}}), baseline)


def test_sd_inpainting_runs_deepcache_and_tome_and_refuses_tgate_in_one_line(tmp_path):
    pipe = quiet_builtin("builtin:tiny-sd-inpaint")
    write_fills(tmp_path / "fills", count=2, size=32)
    prompts = load_prompts(str(tmp_path / "fills"), 2)
    check_conditioning(pipe, prompts, 2)
    config = GenerationConfig(steps=10, height=32, width=32, guidance_scale=7.5, batch_size=2)
    images = partial(first_images, pipe, config, prompts)

    assert_each_skips_and_restores(pipe, images, (
        {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}},
        {"tome": {"ratio": 0.5, "max_downsample": 1}}), images())
    with pytest.raises(ValueError, match="tgate runs its own text-to-image loop in place of "
                                         "StableDiffusionInpaintPipeline's call"):
        apply_setting(pipe, {"tgate": {"gate_step": 3}})


FILL_SPEC = """
name = "fill"
[model]
id = "builtin:tiny-flux-fill"
device = "cpu"
steps = 8
height = 128
width = 128
guidance_scale = 30.0
[prompts]
source = "fills"
num_samples = 2
batch_size = 2
[quality]
clip_model = "builtin:tiny"
clip_pretrained = "none"
metric = "psnr"
limit = 20.0
[search]
accelerators = ["fbcache"]
"""


def test_inpainting_from_the_command_line_and_its_mismatches_in_one_line(tmp_path):
    write_fills(tmp_path / "fills", count=2)
    spec = write_spec(tmp_path / "fill.toml", FILL_SPEC)
    result = optsearch_cmd("evaluate", str(spec), "--set", "fbcache.threshold=0.5", "--json",
                           "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["compute_fraction"] < 1 and measured["psnr"]["mean"] > 10

    # text prompts to an inpainting pipeline; T-GATE on an inpainting UNet: one line, exit 2
    spec = write_spec(tmp_path / "text.toml", FILL_SPEC.replace('source = "fills"', 'source = "builtin"'))
    result = optsearch_cmd("check", str(spec), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "fills a masked region of each prompt's image: set prompts.image_column and " \
           "prompts.mask_column" in result.stderr
    sd_spec = FILL_SPEC.replace("tiny-flux-fill", "tiny-sd-inpaint").replace("128", "32")
    spec = write_spec(tmp_path / "tgate.toml", sd_spec.replace('["fbcache"]', '["deepcache", "tgate"]'))
    result = optsearch_cmd("check", str(spec), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "tgate runs its own text-to-image loop" in result.stderr
    spec = write_spec(tmp_path / "sd.toml", sd_spec.replace('["fbcache"]', '["deepcache"]'))
    result = optsearch_cmd("check", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "with an image of 128x128 px and a mask of 13% of it" in result.stdout
    # masks to a pipeline that takes none
    with pytest.raises(PromptError, match="takes no mask: the prompts' masks would be ignored"):
        check_conditioning(build_builtin("builtin:tiny-flux-kontext"),
                           load_prompts(str(tmp_path / "fills"), 2))


def test_a_grid_shows_the_region_each_prompt_filled(tmp_path):
    import io

    import optuna
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta

    from optsearch.storage.artifacts import upload_grid

    study = optuna.create_study()
    store = FileSystemArtifactStore(str(tmp_path))
    black = np.zeros((1, 32, 32, 3), np.uint8)
    prompt = ConditionedPrompt("a window", Image.new("RGB", (8, 8), COLORS[1]), mask_of(8, (0, 0, 0.5, 1)))
    upload_grid(store, study, "fill.png", "trial 0", [prompt], 1, black, black)
    meta = get_all_artifact_meta(study)[0]
    grid = Image.open(io.BytesIO((tmp_path / meta.artifact_id).read_bytes())).convert("RGB")
    cell, gap, middle = 192, 4, 22 + 16 + 192 // 2
    left, right = grid.getpixel((gap + cell // 4, middle)), grid.getpixel((gap + 3 * cell // 4, middle))
    assert right == COLORS[1]  # outside the mask: the image as given
    assert left[0] > 100 and left != COLORS[1]  # inside: tinted red, the region to fill


def test_the_python_export_of_pab_on_flux_fill_serves_without_optsearch(tmp_path):
    """FLUX Fill tracks no current timestep: the export read `pipe.current_timestep` and failed
    at the first step; it now reads each transformer call's, as optsearch measured it."""
    from diffusers import FluxFillPipeline

    texts = write_fills(tmp_path / "fills", count=2)
    setting = {"pab": {"spatial_attention_block_skip_range": 2, "timestep_skip_low": 100,
                       "timestep_skip_high": 900}}
    url = study_with_winner(tmp_path, FILL_SPEC.replace('["fbcache"]', '["pab"]'), setting)
    accelerate = exported_function(export(tmp_path, url, "fill", "diffusers", "accelerate_pipe.py"))
    prompts = load_prompts(str(tmp_path / "fills"), 2)

    def plain_fill() -> FluxFillPipeline:  # the class users load, not the builtin's
        pipe = FluxFillPipeline(**build_builtin("builtin:tiny-flux-fill").components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def images(call, **kwargs) -> np.ndarray:
        import torch

        return call(prompt=texts, image=[p.image for p in prompts], mask_image=[p.mask for p in prompts],
                    height=128, width=128, max_sequence_length=32, guidance_scale=30.0,
                    generator=[torch.Generator("cpu").manual_seed(i) for i in range(2)],
                    output_type="np", **{"num_inference_steps": 8, **kwargs}).images

    with optsearch.apply(plain_fill(), setting) as run:
        expected = images(run)
    pipe = plain_fill()
    np.testing.assert_array_equal(images(pipe, **accelerate(pipe)), expected)
    assert not np.array_equal(expected, images(plain_fill()))  # PAB did broadcast
