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


def test_check_measures_what_each_modes_factors_add_to_memory(tmp_path):
    """Full mode keeps (order + 1) factors of every attention output, lite mode of the output
    projection's alone: on tiny-flux at batch 2 and 128 px, 6 modules x 96 tokens x 128 channels
    x 4 bytes x 2 orders x 2 images = 1152 KiB, and 64 image tokens x 64 channels = 64 KiB (what
    benchmarks/taylorseer_lite.py read at a call's last step)."""
    result = optsearch_cmd("check", str(write_spec(tmp_path / "s.toml", BOTH_MODES)))
    assert result.returncode == 0, result.stderr
    assert ("taylorseer: its factors add full mode 1.12 MiB, lite mode 0.0625 MiB at batch size 2 "
            "and max_order 1 (measured in one call)") in result.stdout


def test_factors_beyond_the_free_memory_are_a_warning_that_names_the_way_out():
    from optsearch.cli.memory_facts import factors_text

    facts = {"taylorseer_factors": {False: 3 * 2**30, True: 2**20}, "batch_size": 4,
             "taylorseer_order": 2}
    lines = factors_text(facts, free=2.0)
    assert lines[0].startswith("taylorseer: its factors add full mode 3 GiB, lite mode 1 MiB")
    assert lines[1] == ("memory: taylorseer's factors need more than the 2.0 GiB free now: lower "
                        "prompts.batch_size or max_order, or set use_lite_mode = true")
    assert len(factors_text(facts, free=8.0)) == 1
    out_of_memory = factors_text({**facts, "taylorseer_factors": {False: None, True: 2**20}}, free=8.0)
    assert out_of_memory[0].startswith("taylorseer: its factors add full mode ran out of memory, "
                                       "lite mode 1 MiB")
    assert out_of_memory[1].startswith("memory: taylorseer's factors need more than the 8.0 GiB")
