"""Search cost: speedup-aware early stop, warm starts, and what they must never change."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from optsearch.optimize.early_stop import rule_for
from optsearch.optimize.warm_start import published_settings, trial_params
from optsearch.study_spec import load_spec
from tests.conftest import TINY_SPEC, optsearch_cmd, storage_snapshot, write_spec

FAST = {"deepcache.cache_interval": 8, "deepcache.cache_branch_id": 0, "tome.ratio": 0.6,
        "tome.max_downsample": 2}
SLOW = {"deepcache.cache_interval": 1, "deepcache.cache_branch_id": 0, "tome.ratio": 0.05,
        "tome.max_downsample": 1}  # a full pass every step, 12 of 256 tokens merged: no faster than
# the baseline, yet not inert (ratio 0.0 merges nothing: the baseline itself, stopped as inert)
# 8 prompts in 4 batches: early stop may decide after 2; every value of FAST and SLOW in the space.
EIGHT = (TINY_SPEC.replace("num_samples = 4", "num_samples = 8").replace("limit = 30.0", "limit = 5.0")
         + "[space.deepcache]\ncache_interval = [1, 8]\n[space.tome]\nratio = [0.0, 0.7]\n")


def study_with(tmp_path, text: str, *enqueued: dict, name: str = "tiny") -> str:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = write_spec(tmp_path / f"{name}.toml", text)
    created = optsearch_cmd("study", "create", str(spec), "--storage", url, "--name", name)
    assert created.returncode == 0, created.stderr
    study = optuna.load_study(study_name=name, storage=url)
    for params in enqueued:
        study.enqueue_trial(params)
    ran = optsearch_cmd("worker", "--study", name, "--storage", url, "--quiet", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    return url


def trials(url: str, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials()


def test_unreachable_target_speedup_stops_trials_for_speedup(tmp_path):
    text = EIGHT.replace("[search]", "[objective]\nmode = \"target-speedup\"\ntarget_speedup = 100.0\n"
                                     "[search]").replace("n_trials = 4", "n_trials = 2")
    url = study_with(tmp_path, text)
    done = trials(url)
    assert len(done) == 2
    for trial in done:
        assert trial.state == TrialState.PRUNED
        assert trial.user_attrs["early_stop_reason"] == "speedup"
        # after 2 of 4 batches, or 3 when 2 a side leave the per-look interval wider than 100x
        assert 2 <= trial.user_attrs["batches_evaluated"] < trial.user_attrs["n_batches"] == 4
        # the look decided on the pooled interval at its per-look level; the recorded Welch
        # interval of 2 batches (df 1) is another, and reached 251x on a busy CI machine
        assert trial.user_attrs["speedup"] < 100
    saved = sum(4 - t.user_attrs["batches_evaluated"] for t in done)
    shown = optsearch_cmd("study", "show", "tiny", "--storage", url)
    assert f"early stop (speedup): 2 trials, {saved} batches" in shown.stdout


def test_max_speedup_stops_clearly_slower_trials_as_dominated_and_keeps_the_winner(tmp_path):
    # 8 batches of 1: enough samples for a clear interval even on a busy 2-core machine
    text = EIGHT.replace("n_trials = 4", "n_trials = 2\nwarm_start = []").replace(
        "batch_size = 2", "batch_size = 1")
    url = study_with(tmp_path, text, FAST, SLOW)
    fast, slow = trials(url)
    assert fast.state == TrialState.COMPLETE and fast.user_attrs["batches_evaluated"] == 8
    assert slow.state == TrialState.PRUNED
    assert slow.user_attrs["early_stop_reason"] == "dominated"
    assert slow.user_attrs["batches_evaluated"] < 8
    # clearly slower: its figure is under the winner's low bound (its recorded 95 % Welch interval,
    # from the 2-3 batches it ran, may still overlap: the look decides on pooled noise)
    assert slow.user_attrs["speedup"] < fast.user_attrs["speedup_low"]
    assert slow.intermediate_values  # the sampler is told what was measured
    # one worker, one baseline timing: the look compared the two trials' own batch seconds
    assert slow.user_attrs["baseline_id"] == fast.user_attrs["baseline_id"] is not None
    assert len(fast.user_attrs["batch_seconds"]) == 8
    assert np.mean(slow.user_attrs["batch_seconds"]) > np.mean(fast.user_attrs["batch_seconds"])
    exported = optsearch_cmd("study", "export", "tiny", "--storage", url, "-o", "sp.json",
                             cwd=tmp_path)
    assert exported.returncode == 0
    assert json.loads((tmp_path / "sp.json").read_text())["best"]["trial"] == fast.number


def test_early_stop_never_changes_a_finished_trials_figures(tmp_path):
    off = study_with(tmp_path, EIGHT.replace("n_trials = 4", "n_trials = 1\nwarm_start = []\n"
                                             "early_stop = false"), FAST, name="off")
    on = study_with(tmp_path, EIGHT.replace("n_trials = 4", "n_trials = 1\nwarm_start = []"), FAST,
                    name="on")
    [without], [with_rules] = trials(off, "off"), trials(on, "on")
    assert without.state == with_rules.state == TrialState.COMPLETE
    for key in ("image_digests", "psnr", "psnr_low", "ssim", "clip_loss", "batches_evaluated"):
        assert without.user_attrs[key] == with_rules.user_attrs[key], key
    row = with_rules.user_attrs["psnr_per_prompt"]  # what early stop learns prompt effects from
    assert len(row) == 8 and np.mean(row) == pytest.approx(with_rules.user_attrs["psnr"])


def test_trials_on_all_prompts_teach_early_stop_the_prompts_effects(tmp_path):
    """The next trial's rule removes the prompts' effects learned from complete, not reused
    trials measured on all the study's prompts (5 or more; `<metric>_per_prompt`)."""
    spec = load_spec(write_spec(tmp_path / "t.toml", EIGHT))
    row = [30.0, 32.0, 31.0, 29.0, 30.5, 29.5, 33.0, 28.0]
    finished = []
    for shift, attrs in [(0.0, {}), (1.0, {}), (2.0, {}), (9.0, {"reused_from": 0}),
                         (9.0, {"early_stopped": True})]:
        state = TrialState.PRUNED if attrs.get("early_stopped") else TrialState.COMPLETE
        finished.append(optuna.trial.create_trial(
            state=state, value=None if state == TrialState.PRUNED else 1.0,
            user_attrs={"psnr_per_prompt": [v + shift for v in row], **attrs}))
    finished.append(optuna.trial.create_trial(value=1.0, user_attrs={"psnr_per_prompt": row[:4]}))
    assert rule_for(spec, finished, "here").prompt_effects is None  # 3 usable rows: too few
    for extra in ([v + 3.0 for v in row], row[::-1]):
        finished.append(optuna.trial.create_trial(value=1.0, user_attrs={"psnr_per_prompt": extra}))
    effects = rule_for(spec, finished, "here").prompt_effects
    usable = np.array([row, *([v + s for v in row] for s in (1.0, 2.0, 3.0)), row[::-1]])
    expected = (usable - usable.mean(axis=1, keepdims=True)).mean(axis=0)
    assert effects is not None and np.allclose(effects.effects, expected)


def test_published_warm_start_comes_first_and_stays_inside_the_space(tmp_path):
    text = EIGHT.replace("n_trials = 4", "n_trials = 3") + "[space.tgate]\ngate_step = [5, 12]\n"
    text = text.replace('accelerators = ["deepcache", "tome"]', 'accelerators = "any"').replace(
        "steps = 8", "steps = 12").replace("cache_interval = [1, 8]", "cache_interval = [2, 4]")
    spec = load_spec(write_spec(tmp_path / "any.toml", text))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    created = optsearch_cmd("study", "create", str(tmp_path / "any.toml"), "--storage", url, "--name", "any")
    assert created.returncode == 0, created.stderr
    waiting = optuna.load_study(study_name="any", storage=url).get_trials(states=(TrialState.WAITING,))
    enqueued = [t.system_attrs["fixed_params"] for t in waiting]
    # DeepCache N=5 lies outside cache_interval [2, 4]: only N=3 points, one per combo.
    assert [p["combo"] for p in enqueued] == ["deepcache", "deepcache+tome", "deepcache+tgate",
                                             "deepcache+tome+tgate"]
    for params in enqueued:
        assert params["deepcache.cache_interval"] == 3 and params["deepcache.cache_branch_id"] == 0
        assert params.get("tome.ratio", 0.5) == 0.5 and params.get("tgate.gate_step", 10) == 10
    assert len(published_settings(spec)) == 8
    assert trial_params(spec, {"deepcache": {"cache_interval": 5, "cache_branch_id": 0}},
                        clip=False) is None
    ran = optsearch_cmd("worker", "--study", "any", "--storage", url, "--quiet", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    first = optuna.load_study(study_name="any", storage=url).get_trials()[:3]
    assert [t.user_attrs["combo"] for t in first] == ["deepcache", "deepcache+tome", "deepcache+tgate"]


def test_warm_start_from_another_study_is_clipped_and_a_missing_one_is_exit_2(tmp_path):
    url = study_with(tmp_path, EIGHT.replace("n_trials = 4", "n_trials = 1\nwarm_start = []"), FAST,
                     name="sd15")
    narrow = write_spec(tmp_path / "narrow.toml", TINY_SPEC.replace("n_trials = 4", "n_trials = 1")
                        + "[space.deepcache]\ncache_interval = [2, 5]\n[space.tome]\nratio = [0.1, 0.5]\n")
    before = storage_snapshot(url)
    missing = optsearch_cmd("study", "create", str(narrow), "--storage", url, "--warm-start", "nope")
    assert missing.returncode == 2 and "warm start study:nope" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and storage_snapshot(url) == before
    created = optsearch_cmd("study", "create", str(narrow), "--storage", url, "--warm-start", "sd15")
    assert created.returncode == 0, created.stderr
    waiting = optuna.load_study(study_name="tiny", storage=url).get_trials(states=(TrialState.WAITING,))
    enqueued = [t.system_attrs["fixed_params"] for t in waiting]
    clipped = {"deepcache.cache_interval": 5, "deepcache.cache_branch_id": 0, "tome.ratio": 0.5,
               "tome.max_downsample": 2}
    assert enqueued[-1] == clipped  # FAST (interval 8, ratio 0.6) moved into [2, 5] x [0.1, 0.5]
    assert len(enqueued) == 3  # two published points first, then the other study's best


def test_the_rule_learns_the_devices_first_batches_from_trials_measured_on_it(tmp_path):
    """The first-batch record holds the trials measured on this fingerprint, finished or stopped
    early, kept apart by warm-up; reused trials, other devices and one-batch trials say nothing."""
    spec = load_spec(write_spec(tmp_path / "t.toml", EIGHT))
    here = {"fingerprint": "this-device", "warmup_seconds": 0.0}
    finished = []
    for state, attrs in [
        (TrialState.COMPLETE, {**here, "batch_seconds": [1.2, 1.0, 1.0]}),
        (TrialState.PRUNED, {**here, "batch_seconds": [0.9, 1.0]}),
        (TrialState.PRUNED, {**here, "batch_seconds": [0.5]}),
        (TrialState.COMPLETE, {**here, "warmup_seconds": 0.3, "batch_seconds": [1.1, 1.0]}),
        (TrialState.COMPLETE, {**here, "batch_seconds": [3.0, 1.0], "reused_from": 0}),
        (TrialState.COMPLETE, {**here, "fingerprint": "another-device", "batch_seconds": [3.0, 1.0]}),
    ]:
        finished.append(optuna.trial.create_trial(
            state=state, value=1.0 if state == TrialState.COMPLETE else None, user_attrs=attrs))
    record = rule_for(spec, finished, "this-device").first_batches
    assert record.without_warmup == pytest.approx((np.log(1.2), np.log(0.9)))
    assert record.after_warmup == pytest.approx((np.log(1.1),))


def test_a_trial_stops_after_its_first_batch_once_the_device_has_a_first_batch_record(tmp_path):
    """Target-speedup, unreachable target: the first trials need 2 batches to decide; once 5
    trials without a warm-up ran 2 batches or more, the next ones stop after their first."""
    text = EIGHT.replace("[search]", "[objective]\nmode = \"target-speedup\"\ntarget_speedup = 100.0\n"
                                     "[search]").replace("n_trials = 4", "n_trials = 9\nwarm_start = []")
    done = sorted(trials(study_with(tmp_path, text)), key=lambda t: t.number)
    assert len(done) == 9 and all(t.user_attrs["early_stop_reason"] == "speedup" for t in done)
    recorded = {True: 0, False: 0}  # trials of each kind (warmed up or not) with 2 batches or more
    for trial in done:
        warmed = trial.user_attrs["warmup_seconds"] > 0
        if trial.user_attrs["batches_evaluated"] == 1:
            assert recorded[warmed] >= 5  # never before the record is long enough
        else:
            recorded[warmed] += 1
    assert sum(t.user_attrs["batches_evaluated"] == 1 for t in done) >= 1


def test_a_resumed_study_estimates_from_what_its_trials_cost(tmp_path):
    """A worker joining a study with trials finished estimates the rest from them (wall seconds
    per trial, in passes of its baseline: warm-up, scoring and early stops in it), not from an
    assumed 1x-2x speedup, and says from how many."""
    import re

    spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    first = optsearch_cmd("run", str(spec), "--storage", url, "--quiet", "--n-trials", "3", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "trials to go; estimate: 4 trials x 4 prompts x" in first.stdout
    assert "/ a 1x-2x speedup" in first.stdout  # nothing measured yet: assumed
    finished = trials(url)
    assert len(finished) == 3
    passes = [(t.datetime_complete - t.datetime_start).total_seconds()
              / (4 * t.user_attrs["baseline_seconds_per_image"]) for t in finished]
    resumed = optsearch_cmd("run", str(spec), "--storage", url, "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    said = re.search(r"1 trials to go; estimate: 1 trials x 4 prompts x [\d.]+ s/image \(the "
                     r"baseline's\) x ([\d.]+)-([\d.]+) \(a trial's cost in baseline passes, 95%, "
                     r"from the 3 trials finished so far", resumed.stdout)
    assert said, resumed.stdout
    low, high = float(said.group(1)), float(said.group(2))
    mean = sum(passes) / 3
    assert low * 0.95 <= mean <= high * 1.05  # two digits shown
    assert low >= min(passes) * 0.95  # never cheaper than the cheapest trial was
    line = resumed.stdout.split("estimate:")[1].split("\n")[0]
    assert "speedup" not in line and "early stop and reuse make it shorter" not in line  # in it
