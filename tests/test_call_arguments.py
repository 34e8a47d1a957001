"""[model.call]: the other keyword arguments a server passes every call (guidance_rescale,
max_sequence_length, controlnet_conditioning_scale, ...) are passed to every measured call, are
deployment context (check prints them, the export passes them, `optsearch.apply` warns when a
call passes others), and are one line where wrong."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import optsearch
from optsearch.deployment import context_text, measured_context
from optsearch.errors import ModelLoadError, SpecError
from optsearch.measure.generation import GenerationConfig
from optsearch.measure.served import pipeline_from_spec
from optsearch.optimize.deploy import diffusers_python
from optsearch.study_spec import load_spec
from tests.conftest import TINY_SPEC, write_spec
from tests.test_deploy_exports import exported_function, study_with_winner
from tests.test_image_conditioned import first_images, quiet_builtin
from tests.test_img2img import exported_dict

RESCALED = TINY_SPEC.replace("[prompts]", "[model.call]\nguidance_rescale = 0.7\n[prompts]", 1)


def test_the_arguments_reach_every_call_and_are_served_as_measured(tmp_path):
    spec = load_spec(write_spec(tmp_path / "rescaled.toml", RESCALED))
    assert spec.model.call == {"guidance_rescale": 0.7}
    pipe = quiet_builtin(spec.model.id)
    config = GenerationConfig.from_spec(spec)
    prompts = ["a red cube", "a blue sphere"]
    rescaled = first_images(pipe, config, prompts)
    assert not np.array_equal(rescaled, first_images(pipe, GenerationConfig(
        **{**config.__dict__, "call": {}}), prompts))

    url = study_with_winner(tmp_path, RESCALED, {"deepcache": {"cache_interval": 3}})
    exported = exported_dict(url, spec.name)
    assert exported["deployment"]["call"] == {"guidance_rescale": 0.7}
    text = diffusers_python(exported)
    assert "call_kwargs.update({'guidance_rescale': 0.7})  # [model.call], as measured" in text
    served = quiet_builtin(spec.model.id)
    assert exported_function(text)(served)["guidance_rescale"] == 0.7
    with optsearch.apply(pipe, exported) as run, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(prompt="a", num_inference_steps=spec.model.steps, guidance_rescale=0.7)
        assert not [w for w in caught if "guidance_rescale" in str(w.message)]
        run(prompt="a", num_inference_steps=spec.model.steps)  # its default: 0.0
    said = [str(w.message) for w in caught if "guidance_rescale" in str(w.message)]
    assert said == ["optsearch: this setting was measured at guidance_rescale = 0.7; called with "
                    "0.0, its speedup and quality may differ (search again at guidance_rescale = "
                    "0.0 to know)"]


def test_wrong_arguments_are_one_line(tmp_path):
    for table, says in (
            ("num_inference_steps = 20", "model.call.num_inference_steps: is set by optsearch: use "
                                         "model.steps"),
            ("image = 'cat.png'", "model.call.image: is set by optsearch \\(each prompt's\\)"),
            ("eta = {a = 1}", "model.call.eta: must be a string, number, true/false or a list")):
        with pytest.raises(SpecError, match=says):
            load_spec(write_spec(tmp_path / "bad.toml", RESCALED.replace("guidance_rescale = 0.7", table)))
    unknown = load_spec(write_spec(tmp_path / "unknown.toml", RESCALED.replace(
        "guidance_rescale = 0.7", "true_cfg = 2.0")))
    with pytest.raises(ModelLoadError, match="model.call.true_cfg: StableDiffusionPipeline's call "
                                             "takes no true_cfg \\(it takes: prompt, height,"):
        pipeline_from_spec(unknown)
    # what `check` prints of the deployment context, and the export records
    spec = load_spec(write_spec(tmp_path / "ok.toml", RESCALED))
    assert "guidance 7.5, guidance_rescale=0.7" in context_text(measured_context(spec, 2))
