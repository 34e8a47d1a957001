"""Honest numbers, round two (issue 25): a confirmation's interval over A B B A rounds, the winner
by its confirmed lower bound, and exports whose figures come from one device."""

from __future__ import annotations

import json
import math

import pytest
from optuna.trial import create_trial
from scipy.stats import t as student_t

from optsearch.measure.speedup import rounds_interval
from optsearch.optimize import study as studies
from optsearch.optimize.create import create_study
from optsearch.optimize.winner import CONFIRMED_RULE, winner
from optsearch.storage.rdb import open_storage
from optsearch.study_spec import load_spec
from tests.conftest import TINY_SPEC, optsearch_cmd, write_spec

CPU, GPU = "cpu0000000a", "gpu0000000b"


def test_the_rounds_interval_is_a_t_interval_over_the_rounds_log_ratios():
    ratios = [2.0, 2.4, 1.8]
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / 3
    spread = math.sqrt(sum((x - mean) ** 2 for x in logs) / 2)
    half = student_t.ppf(0.975, 2) * spread / math.sqrt(3)
    interval = rounds_interval(ratios, 0.95)
    assert interval.speedup == pytest.approx(math.exp(mean))
    assert interval.low == pytest.approx(math.exp(mean - half))
    assert interval.high == pytest.approx(math.exp(mean + half))
    assert rounds_interval([2.0]).low is None  # one round: nothing known of a repeat
    # a pass-level effect (one round 20 % off) widens it; batch noise inside a round cannot
    assert rounds_interval([2.0, 2.0, 2.4]).high > rounds_interval([2.0, 2.01, 1.99]).high


def record(trial: int, fingerprint: str, speedup: float, low: float, date: str) -> dict:
    return {"key": f"{trial}-{fingerprint}", "trial": trial, "combo": "deepcache",
            "setting": {"deepcache": {"cache_interval": trial + 2}}, "num_samples": 4,
            "speedup": speedup, "speedup_low": low, "speedup_high": speedup * 1.5,
            "psnr": {"mean": 40.0, "low": 39.0, "high": 41.0}, "feasible": True,
            "fingerprint": fingerprint, "device": fingerprint[:3], "date": date,
            "constraints": {"quality": -1.0}, "repeats": 3}


def study_on_two_devices(tmp_path) -> tuple[str, object, object]:
    """Three feasible trials, 0 and 1 on the CPU and 2 on the GPU; trials 0 and 1 confirmed on
    the CPU (0 faster by its point estimate, 1 by its lower bound), trial 2 on the GPU."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = load_spec(write_spec(tmp_path / "t.toml", TINY_SPEC.replace(
        "n_trials = 4", "n_trials = 4\nwarm_start = []")))
    study = create_study(spec, open_storage(url, heartbeat_interval=None))
    for number, (fingerprint, speedup) in enumerate([(CPU, 2.0), (CPU, 1.8), (GPU, 3.0)]):
        study.add_trial(create_trial(value=speedup, user_attrs={
            "combo": "deepcache", "setting": {"deepcache": {"cache_interval": number + 2}},
            "speedup": speedup, "speedup_low": speedup - 0.1, "speedup_high": speedup + 0.1,
            "psnr": 40.0, "psnr_low": 39.0, "psnr_high": 41.0, "fingerprint": fingerprint,
            "device": fingerprint[:3], "constraints": {"quality": -1.0}}))
    studies.save_confirmation(study, record(0, CPU, 2.2, 1.1, "2026-12-01T10:00:00+00:00"))
    studies.save_confirmation(study, record(1, CPU, 1.9, 1.6, "2026-12-01T11:00:00+00:00"))
    return url, study, spec


def test_the_confirmed_winner_is_the_best_lower_bound_of_its_device(tmp_path):
    _, study, spec = study_on_two_devices(tmp_path)
    found = winner(study, spec)
    assert found.trial.number == 1 and found.rule == CONFIRMED_RULE and found.fingerprint == CPU


def test_export_from_one_device_and_an_ambiguous_choice_lists_the_devices(tmp_path):
    url, study, _ = study_on_two_devices(tmp_path)
    studies.save_confirmation(study, record(2, GPU, 2.8, 2.5, "2026-12-02T09:00:00+00:00"))
    ambiguous = optsearch_cmd("study", "export", "tiny", "--storage", url, "-o",
                              str(tmp_path / "x.json"))
    assert ambiguous.returncode == 2 and not (tmp_path / "x.json").exists()
    assert ambiguous.stderr.strip().splitlines() == [
        f"optsearch: error: study 'tiny' was confirmed on 2 devices ({CPU} (cpu), {GPU} (gpu)): "
        "choose one with --fingerprint ID"]
    on_cpu = optsearch_cmd("study", "export", "tiny", "--storage", url, "--fingerprint", CPU,
                           "-o", str(tmp_path / "cpu.json"))
    assert on_cpu.returncode == 0, on_cpu.stderr
    exported = json.loads((tmp_path / "cpu.json").read_text())
    assert exported["fingerprint"] == CPU and exported["best"]["trial"] == 1
    assert [e["trial"] for e in exported["per_combo"].values()] == [0]  # the GPU's trial 2 is not
    assert f"device {CPU}" in on_cpu.stdout
    unknown = optsearch_cmd("study", "export", "tiny", "--storage", url, "--fingerprint", "nope",
                            "-o", str(tmp_path / "n.json"))
    assert unknown.returncode == 2 and "--fingerprint nope: no trial or confirmation" in unknown.stderr


def test_export_warns_when_a_trial_never_confirmed_beats_the_confirmed_winner(tmp_path):
    url, study, _ = study_on_two_devices(tmp_path)
    study.add_trial(create_trial(value=2.5, user_attrs={  # finished after the last confirm
        "combo": "deepcache+tome", "setting": {"deepcache": {"cache_interval": 4},
                                               "tome": {"ratio": 0.5}},
        "speedup": 2.5, "speedup_low": 2.4, "speedup_high": 2.6, "psnr": 40.0, "psnr_low": 39.0,
        "psnr_high": 41.0, "fingerprint": CPU, "device": "cpu", "constraints": {"quality": -1.0}}))
    result = optsearch_cmd("study", "export", "tiny", "--storage", url, "-o",
                           str(tmp_path / "sp.json"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "sp.json").read_text())["unconfirmed_better"] == [3]
    assert "warning: trial(s) 3 beat the confirmed winner on search figures but were never " \
           "confirmed" in result.stderr
    # a luckier reading of a confirmed computation (the same images) is not one to confirm
    for number, speedup in ((4, 2.55), (5, 2.6)):
        study.add_trial(create_trial(value=speedup, user_attrs={
            "combo": "deepcache", "setting": {"deepcache": {"cache_interval": number + 2}},
            "speedup": speedup, "speedup_low": speedup - 0.1, "speedup_high": speedup + 0.1,
            "psnr": 40.0, "psnr_low": 39.0, "psnr_high": 41.0, "fingerprint": CPU, "device": "cpu",
            "batch_size": 2, "image_digests": ["a1", "b2", "c3", "d4"],
            "constraints": {"quality": -1.0}}))
    studies.save_confirmation(study, record(4, CPU, 1.0, 0.9, "2026-12-02T10:00:00+00:00"))
    again = optsearch_cmd("study", "export", "tiny", "--storage", url, "-o", str(tmp_path / "2.json"))
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "2.json").read_text())["unconfirmed_better"] == [3]  # not 5


def test_show_lists_the_confirmed_winner_under_its_combo_beside_the_search_best(tmp_path):
    """A confirmed winner need not be its combo's best search trial: the per-combo table shows it
    too, starred, so the answer `study show` names is one of its rows."""
    from optsearch.cli.show import format_summary, study_summary

    _, study, spec = study_on_two_devices(tmp_path)
    lines = format_summary(study_summary(study, spec)).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("best feasible trial per combo"))
    rows = [line.split()[:4] for line in lines[header + 3:header + 5]]
    # from two devices: each row says its own (a speedup is against that device's baseline)
    assert rows == [["deepcache", "2", GPU, "3.00"], ["deepcache", "*", "1", CPU]]
    assert any(line.startswith("* winner: trial 1,") for line in lines)
