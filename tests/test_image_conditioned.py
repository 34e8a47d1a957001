"""Image-conditioned pipelines: an editing one (FLUX Kontext) and image-to-video (Wan) take an image
with each prompt, from a prompt file's image column or a folder of images; the caches run on
them, and the Python export deploys them without optsearch."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

import optsearch
from optsearch.accelerators import apply_setting
from optsearch.errors import ModelLoadError, PromptError, SpecError
from optsearch.measure.builtin import build_builtin
from optsearch.measure.generation import GenerationConfig, check_conditioning, generate
from optsearch.measure.prompts import ConditionedPrompt, load_prompts, prompts_of
from optsearch.measure.served import check_families
from optsearch.study_spec import load_spec
from tests.conftest import optsearch_cmd, write_spec
from tests.test_deploy_exports import export, exported_function, study_with_winner

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


def write_edits(folder, count: int = 5, size: int = 128, metadata: bool = False) -> list[str]:
    """`count` solid images (image i of color i) and their prompts: a jsonl beside the folder,
    or the folder's own metadata.jsonl (datasets' imagefolder)."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = [f"make picture {i} a watercolor" for i in range(count)]
    rows = []
    for i, text in enumerate(texts):
        Image.new("RGB", (size, size), COLORS[i % len(COLORS)]).save(folder / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "prompt": text} if metadata
                    else {"prompt": text, "image": f"{folder.name}/img{i}.png"})
    target = folder / "metadata.jsonl" if metadata else folder.parent / f"{folder.name}.jsonl"
    target.write_text("\n".join(json.dumps(row) for row in rows))
    return texts


# a spec's prompts (two of an "edits" folder beside it, in one batch) and fidelity to its baseline
EDITS_FOLDER_SPEC = """[prompts]
source = "edits"
num_samples = 2
batch_size = 2
[quality]
clip_model = "builtin:tiny"
clip_pretrained = "none"
metric = "psnr"
limit = 20.0
"""


def quiet_builtin(name: str):
    """A builtin pipeline without its per-step progress bars."""
    pipe = build_builtin(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def first_images(pipe, config: GenerationConfig, prompts, setting=None) -> np.ndarray:
    """The images of `prompts`' first batch, with `setting` (None: plain), no warm-up."""
    return next(iter(generate(pipe, prompts, config, setting=setting, warmup=False))).images


def assert_each_skips_and_restores(pipe, images, settings, baseline) -> None:
    """Each setting skips something (its computed share below 1, where its family counts one),
    changes the images, and once restored the pipeline makes the baseline's bit for bit.
    `images(applied)` generates the test's prompts with a setting (None: plain)."""
    for setting in settings:
        applied = apply_setting(pipe, setting)
        try:
            changed = images(applied)
            computed = applied.computed_fraction()
        finally:
            applied.restore()
        assert computed is None or computed < 1, setting
        assert not np.array_equal(changed, baseline), setting
        np.testing.assert_array_equal(images(None), baseline)


def two_edits(tmp_path) -> tuple[list[str], list[ConditionedPrompt], list[ConditionedPrompt]]:
    """Two edit instructions, their prompts with their own images, and the same instructions
    with each other's images (what tells that each image reaches the call)."""
    texts = write_edits(tmp_path / "edits", count=2)
    prompts = load_prompts(str(tmp_path / "edits.jsonl"), 2, image_column="image")
    swapped = [ConditionedPrompt(text, prompt.image)
               for text, prompt in zip(texts, reversed(prompts), strict=True)]
    return texts, prompts, swapped


def color_of(prompt) -> tuple:
    return prompt.image.getpixel((0, 0))


def test_a_prompt_file_gives_each_prompt_its_own_image(tmp_path):
    texts = write_edits(tmp_path / "edits")
    source = str(tmp_path / "edits.jsonl")
    prompts = load_prompts(source, 5, seed=3, shuffle=True, image_column="image")
    assert sorted(prompts) == sorted(texts) and prompts != texts  # shuffled, all there
    for prompt in prompts:  # each text kept its own image through the shuffle
        assert isinstance(prompt, ConditionedPrompt) and prompt.image.mode == "RGB"
        assert color_of(prompt) == COLORS[texts.index(prompt)]
    # only the images of the prompts taken are read: a missing one further on does not matter
    (tmp_path / "edits" / "img4.png").unlink()
    assert [color_of(p) for p in load_prompts(source, 4, image_column="image")] == COLORS[:4]
    with pytest.raises(PromptError, match="cannot read the image .*img4.png"):
        load_prompts(source, 5, image_column="image")
    with pytest.raises(PromptError, match="no image column 'picture'"):
        load_prompts(source, 2, image_column="picture")
    assert load_prompts(source, 2) == texts[:2]  # without image_column: text prompts
    assert not hasattr(load_prompts(source, 2)[0], "image")


def test_a_folder_of_images_is_a_prompt_source_read_from_the_spec_folder(tmp_path):
    texts = write_edits(tmp_path / "specs" / "edits", metadata=True)
    spec = load_spec(write_spec(tmp_path / "specs" / "s.toml", """
[model]
id = "builtin:tiny-flux-kontext"
[prompts]
source = "edits"
num_samples = 3
[search]
accelerators = ["fbcache"]
"""))
    assert spec.prompts.source == str(tmp_path / "specs" / "edits")  # absolute: every worker
    prompts = prompts_of(spec.prompts)
    assert list(prompts) == texts[:3] and [color_of(p) for p in prompts] == COLORS[:3]

    bad = tmp_path / "bad.toml"
    kontext_model = '[model]\nid = "builtin:tiny-flux-kontext"\n[search]\naccelerators = ["fbcache"]\n'
    with pytest.raises(SpecError, match="prompts.source: folder .*nowhere/ does not exist"):
        load_spec(write_spec(bad, kontext_model + '[prompts]\nsource = "nowhere/"\n'))
    with pytest.raises(SpecError, match="prompts.image_column: prompt set 'builtin' holds no images"):
        load_spec(write_spec(bad, kontext_model + '[prompts]\nsource = "builtin"\nimage_column = "image"\n'))


@pytest.fixture(scope="module")
def kontext():
    return quiet_builtin("builtin:tiny-flux-kontext")


def test_kontext_edits_the_images_it_is_given_and_every_cache_runs_on_it(tmp_path, kontext):
    texts, prompts, swapped = two_edits(tmp_path)
    config = GenerationConfig(steps=8, height=128, width=128, guidance_scale=2.5, batch_size=2)
    images = partial(first_images, kontext, config)

    baseline = images(prompts)
    assert baseline.shape == (2, 128, 128, 3)  # the spec's size (max_area), not Kontext's 1 MP
    np.testing.assert_array_equal(images(prompts), baseline)
    assert not np.array_equal(images(swapped), baseline)  # the images reach the call
    # diffusers' caches need a cache context Kontext's loop never sets: optsearch names each call
    assert_each_skips_and_restores(kontext, lambda applied: images(prompts, applied), (
        {"fbcache": {"threshold": 0.5}},
        {"taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2}}), baseline)
    assert not kontext.transformer._forward_pre_hooks and not kontext.transformer._forward_hooks


def test_flux_control_takes_each_prompts_image_as_its_control_image(tmp_path):
    """FLUX.1 Canny/Depth [dev] (FluxControlPipeline) take the image as `control_image`, not
    `image`: it failed with "takes no image" before. Its loop, like Fill's, names no cache
    context and passes the transformer timestep / 1000; the caches and PAB skip there."""
    pipe = quiet_builtin("builtin:tiny-flux-control")
    texts, prompts, swapped = two_edits(tmp_path)
    check_conditioning(pipe, prompts, 2)
    with pytest.raises(PromptError, match="takes an image with each prompt"):
        check_conditioning(pipe, texts, 2)
    config = GenerationConfig(steps=8, height=128, width=128, guidance_scale=30.0, batch_size=2)
    images = partial(first_images, pipe, config)

    baseline = images(prompts)
    assert not np.array_equal(images(swapped), baseline)  # each prompt's control image reaches the call
    assert_each_skips_and_restores(pipe, lambda applied: images(prompts, applied), (
        {"fbcache": {"threshold": 0.5}},
        {"pab": {"spatial_attention_block_skip_range": 2, "timestep_skip_low": 100,
                 "timestep_skip_high": 900}}), baseline)


def test_qwen_image_edit_edits_each_prompts_image_in_a_batch_and_the_caches_run_on_it(tmp_path):
    """Qwen-Image-Edit reads the image twice: its VAE's latents join the generated image's tokens,
    and its text encoder's vision tower reads it beside the instruction. Its loop names both
    guidance calls' cache contexts; PAB's one cache would serve both, and is refused."""
    pipe = quiet_builtin("builtin:tiny-qwen-image-edit")
    texts, prompts, swapped = two_edits(tmp_path)
    check_conditioning(pipe, prompts, 2)
    config = GenerationConfig(steps=8, height=128, width=128, guidance_scale=1.0, batch_size=2,
                              true_cfg_scale=4.0, negative_prompt=" ")
    images = partial(first_images, pipe, config)

    baseline = images(prompts)
    assert baseline.shape == (2, 128, 128, 3)
    assert not np.array_equal(images(swapped), baseline)  # each prompt's own image reaches the call
    assert_each_skips_and_restores(pipe, lambda applied: images(prompts, applied), (
        {"fbcache": {"threshold": 0.5}},
        {"dbcache": {"residual_diff_threshold": 0.8, "max_warmup_steps": 2}}), baseline)
    applied = apply_setting(pipe, {"pab": {"spatial_attention_block_skip_range": 2,
                                           "timestep_skip_low": 100, "timestep_skip_high": 900}})
    try:
        with pytest.raises(ValueError, match="pab keeps one attention cache for both guidance calls"):
            images(prompts, applied)  # diffusers failed here: "The size of tensor a (20) must match"
    finally:
        applied.restore()
    # at load, before anything is measured: "any" without pab, written out
    spec = load_spec(write_spec(tmp_path / "q.toml", """
[model]
id = "builtin:tiny-qwen-image-edit"
true_cfg_scale = 4.0
negative_prompt = " "
[prompts]
source = "edits.jsonl"
image_column = "image"
[search]
accelerators = "any"
"""))
    with pytest.raises(ModelLoadError, match='pab keeps one attention cache .* "any" includes pab: write '
                       r'search.accelerators = \[\["steps"\], \["fbcache"\], \["taylorseer"\], '
                       r'\["magcache"\], \["dbcache"\]\]'):
        check_families(pipe, spec)


KONTEXT_SPEC = """
name = "kontext"
[model]
id = "builtin:tiny-flux-kontext"
device = "cpu"
steps = 8
height = 128
width = 128
guidance_scale = 2.5
[prompts]
source = "edits.jsonl"
image_column = "image"
num_samples = 2
batch_size = 2
[quality]
clip_model = "builtin:tiny"
clip_pretrained = "none"
metric = "psnr"
limit = 30.0
[search]
accelerators = ["fbcache"]
"""


def test_the_python_export_of_a_kontext_winner_serves_without_optsearch(tmp_path):
    texts = write_edits(tmp_path / "edits", count=2)
    setting = {"fbcache": {"threshold": 0.5}}
    url = study_with_winner(tmp_path, KONTEXT_SPEC, setting)
    text = export(tmp_path, url, "kontext", "diffusers", "accelerate_pipe.py")
    accelerate = exported_function(text)
    inputs = [Image.open(tmp_path / "edits" / f"img{i}.png") for i in range(2)]

    def plain_kontext() -> FluxKontextPipeline:  # the class users load, not the builtin's
        pipe = FluxKontextPipeline(**build_builtin("builtin:tiny-flux-kontext").components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def images(call, **kwargs) -> np.ndarray:
        return call(image=inputs, prompt=texts, height=128, width=128, max_area=128 * 128,
                    _auto_resize=False, guidance_scale=2.5, max_sequence_length=32,
                    generator=[torch.Generator("cpu").manual_seed(i) for i in range(2)],
                    output_type="np", **{"num_inference_steps": 8, **kwargs}).images

    with optsearch.apply(plain_kontext(), setting) as run:
        expected = images(run)
    pipe = plain_kontext()
    served = images(pipe, **accelerate(pipe))  # failed before: "No cache context is set"
    np.testing.assert_array_equal(served, expected)
    assert not np.array_equal(served, images(plain_kontext()))  # the cache did skip something


WAN_I2V_SPEC = """
[model]
id = "builtin:tiny-wan-i2v"
device = "cpu"
steps = 6
guidance_scale = 1.0
[prompts]
source = "edits"
num_samples = 2
batch_size = 1
[quality]
clip_model = "builtin:tiny"
clip_pretrained = "none"
metric = "psnr"
limit = 20.0
[search]
accelerators = ["fbcache"]
"""


def test_image_to_video_runs_one_prompt_a_call_and_mismatches_are_one_line(tmp_path):
    write_edits(tmp_path / "edits", count=2, size=64, metadata=True)
    spec = write_spec(tmp_path / "wan.toml", WAN_I2V_SPEC)
    result = optsearch_cmd("evaluate", str(spec), "--set", "fbcache.threshold=0.3", "--json",
                           "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout)
    assert measured["frames"] == 9 and measured["psnr"]["mean"] > 20  # videos, from their images

    # Wan conditions every prompt of a call on one image: the command says so, one line, exit 2
    spec = write_spec(tmp_path / "bad.toml", WAN_I2V_SPEC.replace("batch_size = 1", "batch_size = 2"))
    result = optsearch_cmd("check", str(spec), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("conditions every prompt of a call on the call's images: set prompts.batch_size = 1"
            in result.stderr)
    # image-to-video without images, and images a text-to-video pipeline would ignore
    images = load_prompts(str(tmp_path / "edits"), 2)
    with pytest.raises(PromptError, match="takes an image with each prompt: set prompts.image_column"):
        check_conditioning(build_builtin("builtin:tiny-wan-i2v"), load_prompts("builtin", 2))
    with pytest.raises(PromptError, match="takes no image: the prompts' images"):
        check_conditioning(build_builtin("builtin:tiny-wan"), images)
    check_conditioning(build_builtin("builtin:tiny-wan-i2v"), images)  # one a call: fine


def test_a_grid_shows_the_image_each_prompt_was_generated_from(tmp_path):
    import io

    import optuna
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta

    from optsearch.storage.artifacts import upload_grid

    study = optuna.create_study()
    store = FileSystemArtifactStore(str(tmp_path))
    black, white = np.zeros((1, 32, 32, 3), np.uint8), np.full((1, 32, 32, 3), 255, np.uint8)
    for name, prompts in (("edit.png", [ConditionedPrompt("a red one", Image.new("RGB", (8, 8), COLORS[0]))]),
                          ("text.png", ["a red one"])):
        upload_grid(store, study, name, "trial 0", prompts, 1, black, white)
    grids = {meta.filename: Image.open(io.BytesIO((tmp_path / meta.artifact_id).read_bytes()))
             for meta in get_all_artifact_meta(study)}
    cell, gap, top = 192, 4, 22 + 16  # a row's first pixel below the title and the prompt line
    assert grids["edit.png"].width == 3 * cell + 4 * gap  # input, baseline, trial
    assert grids["text.png"].width == 2 * cell + 3 * gap  # text prompts: no input column
    middle = top + cell // 2
    assert grids["edit.png"].getpixel((gap + cell // 2, middle)) == COLORS[0]
    assert grids["edit.png"].getpixel((2 * gap + cell + cell // 2, middle)) == (0, 0, 0)
    assert grids["edit.png"].getpixel((3 * gap + 2 * cell + cell // 2, middle)) == (255, 255, 255)
