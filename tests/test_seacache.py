"""SeaCache (diffusers' `SeaCacheConfig`) on builtin:tiny-wan: its "auto" threshold range, its
refusal where diffusers has no indicator, a study that searches it, and its Python export."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

import optsearch
from optsearch.accelerators import seacache
from optsearch.measure.models import load_pipeline
from optsearch.optimize.deploy import diffusers_python
from tests.conftest import optsearch_cmd, write_spec
from tests.test_deploy_exports import exported_function
from tests.test_families import FLUX_SPEC
from tests.test_video import PROMPTS, WAN_SPEC

STEPS = 8


@pytest.fixture(scope="module")
def wan():
    return load_pipeline("builtin:tiny-wan", device="cpu", dtype="float32")


def video(call, **kwargs) -> np.ndarray:
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(len(PROMPTS))]
    kwargs.setdefault("num_inference_steps", STEPS)
    return call(PROMPTS, generator=generators, output_type="np", **kwargs).frames


def run_with(wan, **options) -> tuple[np.ndarray, float]:
    """The videos and the share of transformer calls that ran their blocks."""
    patch = seacache.apply(wan, **options)
    try:
        patch.prepare({})
        return video(wan), patch.computed_fraction()
    finally:
        patch.restore()


def test_the_auto_range_runs_from_reusing_nothing_to_every_reuse_the_limits_allow(wan):
    """Under the smallest measured change nothing is reused (the plain video, bit for bit); at the
    range's top the cache reuses as much as at any threshold; restored, the pipeline is plain."""
    plain = video(wan)
    calibration = seacache.calibrate(wan, lambda: video(wan), {"max_consecutive_cached": [1, 3]})
    low, high = calibration["auto"]["threshold"]
    assert 0 < low < high and calibration["observed"]["steps"] == STEPS - 1
    below, computed = run_with(wan, threshold=low * 0.99, max_consecutive_cached=3)
    assert computed == 1.0 and np.array_equal(below, plain)
    _, at_top = run_with(wan, threshold=high, max_consecutive_cached=3)
    _, at_most = run_with(wan, threshold=1e6, max_consecutive_cached=3)
    inside, between = run_with(wan, threshold=(low + high) / 2, max_consecutive_cached=3)
    assert at_top == at_most < between < 1.0 and not np.array_equal(inside, plain)
    assert np.array_equal(video(wan), plain)


def test_seacache_where_diffusers_has_no_indicator_is_one_line_exit_2(tmp_path):
    spec = write_spec(tmp_path / "flux.toml", FLUX_SPEC.replace(
        '[["steps"], ["magcache"], ["steps", "taylorseer"]]', '[["seacache"]]'))
    result = optsearch_cmd("study", "create", str(spec), "--storage", f"sqlite:///{tmp_path / 's.db'}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "seacache does not apply to this model (transformer pipeline" in result.stderr
    flux = load_pipeline("builtin:tiny-flux", device="cpu", dtype="float32")
    assert "Wan text-to-video and Cosmos 3 only" in seacache.problem_with(flux)
    with pytest.raises(ValueError, match="would run every step in full"):
        seacache.apply(flux, threshold=0.5)


def test_a_study_searches_seacache_in_its_calibrated_range(tmp_path):
    spec = write_spec(tmp_path / "wan.toml", WAN_SPEC.replace(
        'accelerators = [["steps"], ["pab"], ["fastercache"]]', 'accelerators = [["seacache"]]')
        .replace("n_trials = 3", "n_trials = 2") + '[space.seacache]\nthreshold = "auto"\n')
    url = f"sqlite:///{tmp_path / 's.db'}"
    result = optsearch_cmd("run", str(spec), "--storage", url, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = optsearch_cmd("study", "show", "tiny-wan", "--storage", url, "--json")
    low, high = next(iter(json.loads(shown.stdout)["auto_ranges"].values()))["seacache.threshold"]
    trials = optuna.load_study(study_name="tiny-wan", storage=url).get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 2 and all(low <= t.params["seacache.threshold"] <= high for t in trials)
    assert any(t.user_attrs["compute_fraction"] < 1 for t in trials)  # the range reuses something


def test_apply_and_the_python_export_give_the_same_video(wan):
    setting = {"seacache": {"threshold": 0.4, "residual_order": 1, "max_consecutive_cached": 3,
                            "retention_steps": 2}}
    with optsearch.apply(wan, setting) as run:
        ours = video(run)
    exported = {"study": "tiny-wan", "metric": "psnr", "spec": {"model": {"steps": STEPS}},
                "best": {"trial": 0, "setting": setting, "metrics": {}, "confirmed": None}}
    text = diffusers_python(exported)
    assert "SeaCacheConfig(**options)" in text
    kwargs = exported_function(text)(wan)
    try:
        theirs = video(wan, **{k: v for k, v in kwargs.items() if k != "num_inference_steps"})
    finally:
        wan.transformer.disable_cache()
    assert np.array_equal(ours, theirs) and not np.array_equal(ours, video(wan))
