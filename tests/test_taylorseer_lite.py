"""TaylorSeer's two modes (diffusers' `use_lite_mode`): a study fixes one or searches both, each
trial runs the mode it drew, and a mode that cannot act on the model is one line, exit 2."""

from __future__ import annotations

import re

import optuna
import pytest

from optsearch.study_spec import SpecError, load_spec

from .conftest import ROOT, optsearch_cmd, write_spec
from .test_families import FLUX_SPEC
from .test_video import WAN_SPEC

BOTH_MODES = FLUX_SPEC.replace(
    'accelerators = [["steps"], ["magcache"], ["steps", "taylorseer"]]', 'accelerators = ["taylorseer"]'
).replace("n_startup_trials = 6", 'sampler = "grid"\nwarm_start = []') + """
[space.taylorseer]
cache_interval = 3
disable_cache_before_step = 2
max_order = 1
use_lite_mode = [false, true]
"""


def test_a_grid_over_both_modes_measures_each_at_the_same_schedule(tmp_path):
    """Both modes compute on the same schedule (the same share of their hooked calls), but lite
    mode forecasts the whole transformer's output where full mode forecasts each attention
    layer's: other images (lower fidelity on tiny-flux: 49.6 against 64.7 dB at 20 steps)."""
    spec = write_spec(tmp_path / "flux.toml", BOTH_MODES)
    url = f"sqlite:///{tmp_path / 's.db'}"
    result = optsearch_cmd("run", str(spec), "--storage", url, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    measured = [t for t in optuna.load_study(study_name="flux", storage=url).trials
                if t.state == optuna.trial.TrialState.COMPLETE and "reused_from" not in t.user_attrs]
    by_mode = {t.user_attrs["setting"]["taylorseer"]["use_lite_mode"]: t.user_attrs for t in measured}
    assert sorted(by_mode) == [False, True] and len(measured) == 2
    assert "the space is exhausted: all 2 distinct computations are tried" in result.stdout
    assert by_mode[True]["compute_fraction"] == pytest.approx(by_mode[False]["compute_fraction"])
    assert by_mode[True]["compute_fraction"] < 1
    assert by_mode[True]["psnr"] < by_mode[False]["psnr"]


@pytest.mark.parametrize("value, message", [
    ("[true, true]", "space.taylorseer.use_lite_mode: [True, True] names a choice twice"),
    ("1", "space.taylorseer.use_lite_mode: 1 is not one of true or false"),
])
def test_a_mode_that_is_no_bool_is_a_spec_error(tmp_path, value, message):
    text = BOTH_MODES.replace("use_lite_mode = [false, true]", f"use_lite_mode = {value}")
    with pytest.raises(SpecError, match=re.escape(message)):
        load_spec(write_spec(tmp_path / "s.toml", text))


def test_searching_full_mode_too_on_wan_is_one_line_exit_2(tmp_path):
    """Full mode hooks nothing of Wan: its trials would time the plain pipeline."""
    text = WAN_SPEC.replace('[["steps"], ["pab"], ["fastercache"]]', '[["taylorseer"]]') \
        + "\n[space.taylorseer]\nuse_lite_mode = [false, true]\n"
    result = optsearch_cmd("check", str(write_spec(tmp_path / "s.toml", text)))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "taylorseer hooks no module of WanTransformer3DModel" in result.stderr


def test_lite_mode_is_the_default_on_video_and_in_its_any(tmp_path):
    """On video, full mode hooks nothing of Wan and would keep factors of every attention
    layer's output over all the video's tokens: "any" includes TaylorSeer there, in lite mode."""
    wan = load_spec(write_spec(tmp_path / "wan.toml", (ROOT / "studies" / "tiny-wan.toml").read_text()))
    flux = load_spec(write_spec(tmp_path / "flux.toml", BOTH_MODES.split("[space.taylorseer]")[0]))
    assert ("taylorseer",) in wan.search.combos
    assert wan.param_range("taylorseer", "use_lite_mode") == (True,)
    assert flux.param_range("taylorseer", "use_lite_mode") == (False,)
