"""Multi-reference editing (FLUX.2 [dev], Qwen-Image-Edit-2509): one prompt conditioned on several
reference images, read from a prompt file whose image column holds a list of paths."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
from PIL import Image

from optsearch.errors import PromptError
from optsearch.measure.generation import GenerationConfig, check_conditioning
from optsearch.measure.prompts import ConditionedPrompt, load_prompts, prompts_digest
from optsearch.storage.artifacts import _input_of
from optsearch.study_spec import load_spec
from tests.conftest import one_trial_of_each, write_spec
from tests.test_image_conditioned import assert_each_skips_and_restores, first_images, quiet_builtin

COLORS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 40)]


def write_references(folder, count: int = 2) -> str:
    """A JSON Lines prompt file of `count` prompts, each with two reference images (64 x 64 and
    96 x 64 px: FLUX.2 takes none under 64) beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, color in enumerate(COLORS):
        size = (64, 64) if index % 2 == 0 else (96, 64)
        Image.new("RGB", size, color).save(folder / f"ref{index}.png")
    rows = [{"prompt": f"the shape of picture 1 on the shape of picture 2, number {i}",
             "images": [f"ref{(2 * i) % 4}.png", f"ref{(2 * i + 1) % 4}.png"]} for i in range(count)]
    path = folder / "refs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_prompt_file_gives_each_prompt_its_reference_images(tmp_path):
    source = write_references(tmp_path / "refs")
    prompts = load_prompts(source, 2, image_column="images")
    assert [len(prompt.image) for prompt in prompts] == [2, 2]
    assert [image.size for image in prompts[0].image] == [(64, 64), (96, 64)]
    assert prompts[1].image[0].getpixel((0, 0)) == COLORS[2]
    # every reference counts in the digest that keeps a study's prompts from changing under it
    before = prompts_digest(prompts)
    Image.new("RGB", (96, 64), (0, 0, 0)).save(tmp_path / "refs" / "ref1.png")
    assert prompts_digest(load_prompts(source, 2, image_column="images")) != before
    # the grid's input cell holds them side by side
    assert _input_of(prompts[0]).size == (64 + 96, 64)


def test_a_parquet_file_with_embedded_image_lists_gives_each_prompt_its_references(tmp_path):
    """A dataset whose column is a list of images (datasets' List(Image()), as a hub dataset or
    a parquet file holds them embedded): read undecoded, then only the prompts taken. A list of
    one is that prompt's one image."""
    import io

    import datasets

    def png(color) -> dict:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), color).save(buffer, "PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    features = datasets.Features({"prompt": datasets.Value("string"),
                                  "images": datasets.List(datasets.Image())})
    datasets.Dataset.from_dict({"prompt": ["two references", "one image"],
                                "images": [[png(COLORS[0]), png(COLORS[1])], [png(COLORS[2])]]},
                               features=features).to_parquet(tmp_path / "refs.parquet")
    two, one = load_prompts(str(tmp_path / "refs.parquet"), 2, image_column="images")
    assert [image.getpixel((0, 0)) for image in two.image] == COLORS[:2]
    assert isinstance(one.image, Image.Image) and one.image.getpixel((0, 0)) == COLORS[2]


@pytest.mark.parametrize("model_id, call", [
    ("builtin:tiny-qwen-image-edit-plus", {"guidance_scale": 1.0, "true_cfg_scale": 4.0,
                                           "negative_prompt": " "}),
    ("builtin:tiny-flux2", {"guidance_scale": 4.0})])
def test_each_reference_reaches_the_call_and_the_caches_run_on_it(tmp_path, model_id, call):
    """Both references change the images; the caches skip work on them and leave no trace. Their
    prompts run one a call: a batch would condition every prompt on every image (Qwen-Image-Edit-
    2509 was measured so before, silently)."""
    pipe = quiet_builtin(model_id)
    prompts = load_prompts(write_references(tmp_path / "refs"), 2, image_column="images")
    check_conditioning(pipe, prompts, 1)
    with pytest.raises(PromptError, match="conditions every prompt of a call on the call's images"):
        check_conditioning(pipe, prompts, 2)
    config = GenerationConfig(steps=8, height=32, width=32, batch_size=1, **call)
    images = partial(first_images, pipe, config)
    baseline = images(prompts)
    first_only = [ConditionedPrompt(str(prompts[0]), prompts[0].image[:1])]
    assert not np.array_equal(images(first_only), baseline)  # the second reference counts
    assert_each_skips_and_restores(pipe, lambda applied: images(prompts, applied), (
        {"taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2}},
        {"dbcache": {"residual_diff_threshold": 0.8, "max_warmup_steps": 2,
                     "Fn_compute_blocks": 1}}), baseline)


def test_a_single_image_pipeline_refuses_a_prompt_with_several_in_one_line(tmp_path):
    prompts = load_prompts(write_references(tmp_path / "refs"), 2, image_column="images")
    with pytest.raises(PromptError, match="QwenImageEditSmallInputPipeline takes one image with each "
                                          "prompt, and 'the shape of picture 1 on the shape of "
                                          "picture 2, number 0' carries 2: give each prompt one image, "
                                          r"or use a multi-reference pipeline \(FLUX.2, "
                                          r"Qwen-Image-Edit-2509\)"):
        check_conditioning(quiet_builtin("builtin:tiny-qwen-image-edit"), prompts, 1)


SPEC = """
name = "refs"
[model]
id = "builtin:tiny-qwen-image-edit-plus"
device = "cpu"
steps = 8
height = 32
width = 32
guidance_scale = 1.0
true_cfg_scale = 4.0
negative_prompt = " "
[prompts]
source = "refs/refs.jsonl"
image_column = "images"
num_samples = 2
batch_size = 1
[quality]
clip_model = "builtin:tiny"
clip_pretrained = "none"
metric = "psnr"
limit = 10.0
[search]
accelerators = [["magcache"], ["fbcache"]]
n_trials = 2
warm_start = []
early_stop = false
seed = 0
"""


def test_a_multi_reference_study_calibrates_and_measures_each_family(tmp_path):
    """A worker on the real pipeline: MagCache's and FBCache's "auto" ranges calibrated on the
    references, one trial of each, each computing part of the work."""
    write_references(tmp_path / "refs")
    spec = load_spec(write_spec(tmp_path / "s.toml", SPEC))
    one_trial_of_each(tmp_path, spec, quiet_builtin("builtin:tiny-qwen-image-edit-plus"),
                      ("magcache", "fbcache"))
