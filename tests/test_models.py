"""Model loading: builtin pipelines, schedulers from the model's config, placement rules."""

from __future__ import annotations

import warnings

import pytest
import torch

from optsearch.measure.models import ModelLoadError, load_pipeline, resolve_placement


def test_scheduler_is_built_from_the_models_config():
    pipe = load_pipeline("builtin:tiny", device="cpu", dtype="float32", scheduler="EulerDiscrete")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"  # carried over from DDIM's config
    with pytest.raises(ModelLoadError, match="unknown scheduler 'Warp'"):
        load_pipeline("builtin:tiny", device="cpu", dtype="float32", scheduler="Warp")


def test_half_precision_on_cpu_falls_back_to_float32_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        placement = resolve_placement("cpu", "float16")
    assert placement.dtype == torch.float32
    assert any("float16 is not used on CPU" in str(w.message) for w in caught)


def test_builtin_models_are_deterministic_and_distinct():
    a = load_pipeline("builtin:tiny", device="cpu", dtype="float32")
    b = load_pipeline("builtin:tiny", device="cpu", dtype="float32")
    assert torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)  # same weights every process
    xl = load_pipeline("builtin:tiny-xl", device="cpu", dtype="float32")
    assert hasattr(xl, "text_encoder_2") and not hasattr(a, "text_encoder_2")


def test_missing_folder_and_unknown_builtin():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline("./definitely/not/here", device="cpu", dtype="float32")
    with pytest.raises(ModelLoadError, match="unknown builtin model"):
        load_pipeline("builtin:huge", device="cpu", dtype="float32")


def test_an_offloaded_pipeline_is_placed_where_it_computes():
    """`pipe.device` of a sequentially offloaded pipeline is "meta" (its weights wait on the
    host); the device a trial is timed, scored and fingerprinted on is where it computes, and the
    offload is part of the fingerprint (an offloaded pipeline's timings carry its transfers)."""
    from optsearch.accelerators import execution_device, offload_of
    from optsearch.measure.builtin import build_builtin
    from optsearch.measure.fingerprint import fingerprint

    plain = build_builtin("builtin:tiny")
    offloaded = build_builtin("builtin:tiny")
    offloaded.enable_sequential_cpu_offload(device="cpu")
    assert offloaded.device.type == "meta" and execution_device(offloaded) == torch.device("cpu")
    assert offload_of(plain) is None and offload_of(offloaded) == "sequential"
    (plain_id, plain_facts), (offloaded_id, facts) = fingerprint(plain, 2), fingerprint(offloaded, 2)
    assert "offload" not in plain_facts  # plain studies keep their fingerprints
    assert facts == {**plain_facts, "offload": "sequential"} and offloaded_id != plain_id
