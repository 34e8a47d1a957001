"""torch.compile as served (issue 26, items 1-2): the denoiser compiled before the baseline, each
setting measured on top, compile counted apart from the speedup, graph breaks counted. The
"eager" backend traces as inductor would (same graphs, same breaks) without generating code, so
these run in seconds on a CPU."""

from __future__ import annotations

import pytest

from optsearch.errors import ModelLoadError
from optsearch.measure.compiling import compile_denoiser
from optsearch.measure.evaluate import evaluator_from_spec
from optsearch.measure.fingerprint import fingerprint
from optsearch.measure.models import load_pipeline
from optsearch.storage.notes import trial_note
from optsearch.storage.record import measured_attrs
from optsearch.study_spec import SpecError, spec_from_dict


def flux_spec(**model) -> dict:
    return {"name": "flux", "model": {"id": "builtin:tiny-flux", "device": "cpu", "steps": 8,
                                      "guidance_scale": 3.5, **model},
            "prompts": {"source": "builtin", "num_samples": 2, "batch_size": 2},
            "quality": {"clip_model": "builtin:tiny", "clip_pretrained": "none", "metric": "psnr",
                        "limit": 30.0},
            "search": {"accelerators": [["fbcache"], ["dbcache"]]}}


def test_a_compiled_pipeline_counts_compiles_and_graph_breaks_apart_from_the_speedup():
    spec = spec_from_dict(flux_spec(compile="regional", compile_backend="eager"))
    pipe = load_pipeline("builtin:tiny-flux", device="cpu", dtype="float32")
    eager_id, _ = fingerprint(pipe, 2)
    evaluator = evaluator_from_spec(spec, pipe=pipe)
    compiled_id, facts = fingerprint(pipe, 2)
    assert facts["compile"] == "regional:default:eager" and compiled_id != eager_id
    baseline = evaluator.baseline()
    hooked = evaluator.compare({"fbcache": {"threshold": 0.5}}, baseline)
    cache_dit = evaluator.compare({"dbcache": {"residual_diff_threshold": 0.6}}, baseline)
    assert hooked.compiled == cache_dit.compiled == "regional:default:eager"
    # diffusers' FirstBlockCache decides in a torch.compiler.disable()d function: the graph breaks
    assert hooked.graph_breaks > 0 and hooked.graphs_compiled > 0
    assert cache_dit.graph_breaks == 0  # cache-dit runs the compiled blocks as traced
    for result in (hooked, cache_dit):  # the full-step warm-up compiled every path before timing
        assert result.compiled_while_timed == 0 and result.warmup_seconds > 0
    attrs = measured_attrs(hooked, "psnr", None)
    assert attrs["compile_seconds"] == hooked.warmup_seconds and attrs["graph_breaks"] > 0
    note = trial_note(0, {**attrs, "combo": hooked.combo, "constraints": {"quality": 0.0}}, spec)
    assert "graph breaks** (a hook torch cannot trace)" in note and "not in the speedup" in note


def test_compile_choices_are_checked():
    with pytest.raises(SpecError, match="model.compile: unknown compile 'partial'"):
        spec_from_dict(flux_spec(compile="partial"))

    class NoBlocks(type(load_pipeline("builtin:tiny", device="cpu", dtype="float32").unet)):
        _repeated_blocks = []

    pipe = load_pipeline("builtin:tiny", device="cpu", dtype="float32")
    pipe.unet.__class__ = NoBlocks
    with pytest.raises(ModelLoadError, match="names no repeated blocks"):
        compile_denoiser(pipe, "regional", backend="eager")
