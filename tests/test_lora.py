"""A LoRA as served (`[model] lora`): kept as an adapter beside each layer it adapts (a server
that switches LoRAs) or fused into the weights; the families run on either, and the deployment
context says which was measured."""

from __future__ import annotations

import os
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import optsearch
from optsearch.accelerators import denoiser
from optsearch.deployment import measured_context
from optsearch.errors import ModelLoadError, SpecError
from optsearch.measure.builtin import build_builtin
from optsearch.measure.fingerprint import pipeline_signature
from optsearch.measure.generation import GenerationConfig
from optsearch.measure.models import load_pipeline, with_lora
from optsearch.measure.prompts import load_prompts
from optsearch.measure.served import pipeline_from_spec
from optsearch.optimize.deploy import diffusers_python
from optsearch.study_spec import load_spec
from tests.conftest import TINY_SPEC, optsearch_cmd, write_spec
from tests.test_image_conditioned import assert_each_skips_and_restores, first_images, quiet_builtin


def saved_lora(model_id: str, folder: Path, seed: int = 0) -> Path:
    """A rank-4 LoRA of `model_id`'s denoiser on its attention projections, saved as diffusers
    saves one. Its B matrices are drawn: an untrained LoRA (B = 0) would change nothing."""
    pipe = build_builtin(model_id)
    model = denoiser(pipe)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    layers = "unet_lora_layers" if model_id == "builtin:tiny" else "transformer_lora_layers"
    type(pipe).save_lora_weights(folder, **{layers: get_peft_model_state_dict(model)})
    return folder


def lora_spec(tmp_path: Path, name: str, lines: str) -> Path:
    return write_spec(tmp_path / f"{name}.toml", TINY_SPEC.replace("steps = 8\n", f"steps = 8\n{lines}\n"))


def lora_parameters(pipe) -> int:
    return sum("lora_" in name for name, _ in denoiser(pipe).named_parameters())


def test_a_lora_is_measured_as_an_adapter_or_fused_and_the_unet_families_run_on_it(tmp_path):
    folder = saved_lora("builtin:tiny", tmp_path / "ink")
    adapter = load_spec(lora_spec(tmp_path, "adapter", f'lora = "{folder}"\nlora_scale = 0.8'))
    pipe = pipeline_from_spec(adapter)
    assert pipe.get_active_adapters() == ["optsearch"] and lora_parameters(pipe) > 0
    config = GenerationConfig.from_spec(adapter)
    prompts = load_prompts("builtin", 2)
    images = partial(first_images, pipe, config, prompts)
    baseline = images()
    plain = quiet_builtin("builtin:tiny")
    assert not np.array_equal(first_images(plain, config, prompts), baseline)  # the LoRA counts

    weight_file = folder / "pytorch_lora_weights.safetensors"  # a file names its folder and name
    fused_spec = load_spec(lora_spec(tmp_path, "fused", f'lora = "{weight_file}"\nlora_scale = 0.8\n'
                                                        "fuse_lora = true"))
    fused = pipeline_from_spec(fused_spec)
    assert lora_parameters(fused) == 0  # fused into the weights: no adapter left to run
    pipe.set_adapters(["optsearch"], [1.0])
    full_scale = images()
    pipe.set_adapters(["optsearch"], [0.8])
    fused_images = first_images(fused, config, prompts).astype(int)
    assert np.abs(fused_images - baseline).max() <= 1  # fused at 0.8, not at 1.0
    assert np.abs(fused_images - full_scale).mean() > 4 * np.abs(fused_images - baseline).mean()
    assert len({pipeline_signature(p) for p in (plain, pipe, fused)}) == 3
    mine = quiet_builtin("builtin:tiny")  # the same LoRA under the name a user gave it
    mine.load_lora_weights(str(folder), adapter_name="mine")
    assert pipeline_signature(mine) == pipeline_signature(pipe)  # so `apply` does not warn
    measured = {"best": {"setting": {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}},
                "deployment": measured_context(adapter, 2)}
    assert measured["deployment"]["lora_scales"] == [0.8]
    for scale, warns in ((0.8, False), (0.5, True)):  # the same weights, served at another scale
        mine.set_adapters(["mine"], [scale])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with optsearch.apply(mine, measured) as run:
                run(["a cat"] * 2, num_inference_steps=8, height=32, width=32, output_type="np")
        said = [str(w.message) for w in caught if "lora_scales" in str(w.message)]
        assert said == (["optsearch: this setting was measured at lora_scales = [0.8]; called with "
                         "[0.5], its speedup and quality may differ (search again at lora_scales = "
                         "[0.5] to know)"] if warns else [])

    assert_each_skips_and_restores(pipe, images, (
        {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}},
        {"tome": {"ratio": 0.5, "max_downsample": 1}}, {"tgate": {"gate_step": 4}}), baseline)
    assert pipe.get_active_adapters() == ["optsearch"]

    checked = optsearch_cmd("check", str(tmp_path / "adapter.toml"), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert f"LoRA {folder} at 0.8, an adapter" in checked.stdout
    assert "note: model.lora is measured as an adapter" in checked.stdout
    exported = {"study": "fused", "metric": "psnr", "spec": {"model": {"steps": 8}},
                "deployment": measured_context(fused_spec, 2), "best": {
                    "trial": 0, "setting": {"steps": {"num_inference_steps": 6}}, "confirmed": None,
                    "metrics": {"speedup": 1.3, "speedup_low": 1.2, "speedup_high": 1.4,
                                "psnr": 30.0, "psnr_low": 29.0, "psnr_high": 31.0}}}
    assert exported["deployment"]["lora"] == f"{weight_file} at 0.8, fused"  # in the export
    assert f"LoRA {weight_file} at 0.8, fused: serve at it" in diffusers_python(exported)


def test_a_lora_that_cannot_be_served_is_one_line(tmp_path):
    for lines, says in (("lora_scale = 0.5", "model.lora_scale: applies with model.lora"),
                        ("fuse_lora = true", "model.fuse_lora: applies with model.lora"),
                        ('lora = ["a", "b"]\nlora_scale = [0.8]', "gives 1 scales for 2 LoRAs"),
                        ('lora = ["a", "b"]\nlora_weight_name = "x.safetensors"',
                         "model.lora_weight_name: applies to one LoRA"),
                        ('lora = "a"\nlora_scale = "high"', "model.lora_scale: must be a number"),
                        ("lora = []", "model.lora: must be a LoRA's hub id, folder or .safetensors")):
        with pytest.raises(SpecError, match=says):
            load_spec(lora_spec(tmp_path, "bad", lines))
    factory = TINY_SPEC.replace('id = "builtin:tiny"', 'id = "pipes:build"\nlora = "ink"')
    with pytest.raises(SpecError, match="model.lora: applies to a hub id, folder or builtin"):
        load_spec(write_spec(tmp_path / "factory.toml", factory))
    missing = load_spec(lora_spec(tmp_path, "missing", f'lora = "{tmp_path / "nowhere"}"'))
    with pytest.raises(ModelLoadError, match=r"model.lora folder '.*nowhere' does not exist"):
        pipeline_from_spec(missing)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match=r"cannot load model.lora '.*empty'"):
        pipeline_from_spec(load_spec(lora_spec(tmp_path, "empty", f'lora = "{tmp_path / "empty"}"')))
    sd_lora = saved_lora("builtin:tiny", tmp_path / "sd-lora")  # diffusers loads none of it
    with pytest.raises(ModelLoadError, match="model.lora '.*sd-lora' adapts no layer of "
                                             ".*FluxPipeline: a LoRA for another model"):
        with_lora(build_builtin("builtin:tiny-flux"), [(str(sd_lora), 1.0)])
    with pytest.raises(ModelLoadError, match="model.lora: Wan 2.2's two experts each take their own"):
        with_lora(build_builtin("builtin:tiny-wan22"), [(str(tmp_path / "empty"), 1.0)])
    ran = optsearch_cmd("check", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert ran.returncode == 2 and "model.lora folder" in ran.stderr and "Traceback" not in ran.stderr


def test_flux_lora_adapters_run_under_the_transformer_caches(tmp_path):
    """Two LoRAs, each at its scale; diffusers' hooks and cache-dit wrap the transformer's blocks,
    whose projections now carry both adapters: each cache skips work on them and leaves no
    trace."""
    style, detail = (str(saved_lora("builtin:tiny-flux", tmp_path / name, seed))
                     for seed, name in enumerate(("style", "detail")))
    pipe = with_lora(load_pipeline("builtin:tiny-flux", "cpu", "float32"), [(style, 0.7), (detail, 0.5)])
    assert sorted(pipe.get_active_adapters()) == ["optsearch-0", "optsearch-1"]
    config = GenerationConfig(steps=8, height=128, width=128, guidance_scale=3.5, batch_size=2)
    prompts = load_prompts("builtin", 2)
    images = partial(first_images, pipe, config, prompts)
    baseline = images()
    for others in ([], [(style, 0.7)]):  # no LoRA, the first alone: each changes the images
        other = load_pipeline("builtin:tiny-flux", "cpu", "float32")
        other = with_lora(other, others) if others else other
        assert not np.array_equal(first_images(other, config, prompts), baseline)
    assert_each_skips_and_restores(pipe, lambda applied: images(applied), (
        {"fbcache": {"threshold": 0.5}},
        {"taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2}},
        {"dbcache": {"residual_diff_threshold": 0.5, "max_warmup_steps": 1}}), baseline)
