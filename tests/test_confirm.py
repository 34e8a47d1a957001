"""`optsearch study confirm`: unseen prompts, interleaved timing, persistence, and what export takes."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
from optuna.trial import create_trial
from optuna_dashboard import get_note

from optsearch.formatting import format_speedup
from optsearch.measure.devices import conditions_here, device_name
from optsearch.measure.evaluate import evaluator_from_spec
from optsearch.measure.metrics import Interval
from optsearch.measure.prompts import confirm_prompts, load_prompts
from optsearch.optimize import objectives
from optsearch.optimize import study as studies
from optsearch.optimize.confirm_targets import ConfirmOptions, ConfirmTargets, confirm_seed
from optsearch.optimize.create import create_study
from optsearch.optimize.study import CONFIRM_PREFIX
from optsearch.optimize.worker import Worker, WorkerOptions
from optsearch.storage.rdb import open_storage
from optsearch.study_spec import load_spec
from tests.conftest import SLOW_SPEC, TINY_SPEC, optsearch_cmd, optsearch_process, write_spec

AGGRESSIVE = {"deepcache.cache_interval": 8, "deepcache.cache_branch_id": 0, "tome.ratio": 0.6,
              "tome.max_downsample": 2}
FAITHFUL = {"deepcache.cache_interval": 2, "deepcache.cache_branch_id": 0, "tome.ratio": 0.0,
            "tome.max_downsample": 1}  # a full pass every other step, nothing merged: near the baseline


def stored_confirmations(url: str, name: str = "tiny") -> dict[str, dict]:
    return studies.confirmations(optuna.load_study(study_name=name, storage=url))


def test_confirm_prompts_are_the_next_ones_of_the_source(tmp_path):
    spec = load_spec(write_spec(tmp_path / "tiny.toml", TINY_SPEC))
    assert confirm_prompts(spec) == load_prompts("builtin", 8)[4:8]
    other = load_spec(write_spec(tmp_path / "c.toml", TINY_SPEC + "[confirm]\nnum_samples = 3\n"))
    assert confirm_prompts(other) == load_prompts("builtin", 7)[4:7]


def test_confirm_without_enough_unseen_prompts_is_one_line_exit_2(tmp_path):
    """Caught before the search when the source is local; a study whose stored spec asks for more
    (a hub source read only by workers) fails `study confirm` in one line."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    text = TINY_SPEC.replace("n_trials = 4", "n_trials = 1")
    spec = write_spec(tmp_path / "tiny.toml", text + "[confirm]\nnum_samples = 500\n")
    refused = optsearch_cmd("run", str(spec), "--storage", url, "--quiet", cwd=tmp_path)
    assert refused.returncode == 2 and "confirmation needs 500 unseen prompts" in refused.stderr
    assert optuna.get_all_study_summaries(url) == []  # nothing searched, nothing created
    # a study with one feasible trial, made in this process (the search is tested elsewhere)
    study = create_study(load_spec(write_spec(tmp_path / "tiny.toml", text)),
                         open_storage(url, heartbeat_interval=None))
    study.add_trial(create_trial(value=2.0, user_attrs={
        "combo": "deepcache", "setting": {"deepcache": {"cache_interval": 3}}, "speedup": 2.0,
        "speedup_low": 1.9, "speedup_high": 2.1, "psnr": 40.0, "psnr_low": 39.0,
        "psnr_high": 41.0, "constraints": {"quality": -1.0}}))
    stored = study.user_attrs["optsearch:spec"]
    study.set_user_attr("optsearch:spec", {**stored, "confirm": {"num_samples": 500}})
    result = optsearch_cmd("study", "confirm", "tiny", "--storage", url, "--quiet", cwd=tmp_path)
    assert result.returncode == 2 and "confirmation needs 500 unseen prompts" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def run_worker(url: str, spec_path, pipe, n_trials: int | None = None) -> None:
    """A worker in this process on the session's pipeline (the CLI's is tested elsewhere)."""
    spec = load_spec(spec_path)
    Worker(url, spec.name, WorkerOptions(progress=False, n_trials=n_trials),
           evaluator=evaluator_from_spec(spec, pipe=pipe)).run()


def test_confirm_survives_sigkill_and_resumes_without_repeating(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # two distinct settings (a seeded sampler), both clearly faster than the baseline however
    # loaded the machine (DeepCache every 4th step or rarer): confirmation takes only such trials
    spec = write_spec(tmp_path / "tiny.toml", SLOW_SPEC.replace("limit = 30.0", "limit = 5.0")
                      .replace("n_trials = 4", "n_trials = 2\nearly_stop = false\nseed = 0")
                      .replace("steps = 16", "steps = 8")  # A B B A rounds: 4 passes a round
                      + "[confirm]\nnum_samples = 2\n"
                      + "[space.deepcache]\ncache_interval = [4, 8]\ncache_branch_id = 0\n")
    ran = optsearch_cmd("run", str(spec), "--storage", url, "--quiet", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    confirm = optsearch_process("study", "confirm", "tiny", "--storage", url, "--top", "3",
                                "--repeats", "2", "--quiet", cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not stored_confirmations(url):
        assert confirm.poll() is None, confirm.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    confirm.send_signal(signal.SIGKILL)
    confirm.wait()
    first = stored_confirmations(url)
    assert len(first) == 1

    # `run --confirm` again (the search is complete, its confirmation is not) resumes it too
    again = optsearch_cmd("run", str(spec), "--storage", url, "--confirm", "3", "--quiet",
                          "--repeats", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "is complete" in again.stdout and "confirmed on 2 unseen prompts" in again.stdout
    after = stored_confirmations(url)
    for key, record in first.items():
        assert after[key] == record  # kept as stored, not measured again
    # one line for each setting it confirmed, as stored (not for those stored before)
    said = [line for line in again.stdout.splitlines() if ": confirmed trial " in line]
    assert len(said) == len(after) - len(first) >= 1
    for line in said:
        number = int(line.split(": confirmed trial ")[1].split()[0])
        record = next(r for r in after.values() if r["trial"] == number)
        assert f"on 2 unseen prompts: speedup {format_speedup(record)} (2 A B B A rounds)" in line
    settings = [json.dumps(r["setting"], sort_keys=True) for r in after.values()]
    assert len(settings) == len(set(settings)) >= 2
    for record in after.values():
        assert record["num_samples"] == 2 and record["repeats"] == 2
        assert record["seed"] == 43 and record["timing"] == "ABBA rounds"  # its own noise
        assert len(record["round_speedups"]) == 2
        assert record["prompts"] == load_prompts("builtin", 6)[4:6]
        assert record["speedup_low"] <= record["speedup"] <= record["speedup_high"]
    # The dashboard says what it shows: objective names, and a note per trial with the intervals.
    from optuna_dashboard._note import get_note_from_system_attrs

    study = optuna.load_study(study_name="tiny", storage=url)
    assert study.metric_names == ["speedup"]
    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    for record in after.values():
        trial_id = study.trials[record["trial"]]._trial_id
        note = get_note_from_system_attrs(system_attrs, trial_id)["body"]
        assert "speedup **" in note and "psnr **" in note
        assert "Confirmed on 2 unseen prompts (2 A B B A timing rounds, own noise)" in note
    shown = optsearch_cmd("study", "show", "tiny", "--storage", url)
    assert "confirmations on unseen prompts" in shown.stdout and "confirmed speedup" in shown.stdout
    # a third run has nothing left to measure: it prints what is stored, and loads no pipeline
    third = confirm_reporting_diffusers(url, tmp_path)
    assert third.returncode == 0 and stored_confirmations(url) == after, third.stderr
    assert "(stored: each was confirmed on this host's cpu:" in third.stdout
    assert "diffusers loaded: False" in third.stdout
    for record in after.values():
        assert re.search(rf"^{record['trial']} .* {re.escape(format_speedup(record))} ", third.stdout, re.M)
    # nor are those stored under another torch, diffusers or CPU thread count (a record stored
    # without its facts is read with its fingerprint's baseline's)
    targets = ConfirmTargets.load(url, "tiny", ConfirmOptions(top=3))
    here = conditions_here("cpu")
    found = targets.stored_here(here)
    assert [r["setting"] for r in found] == [t.user_attrs["setting"] for t in targets.candidates]
    assert all(after[r["key"]] == r for r in found)
    for changed in ({"torch": "2.0.0"}, {"diffusers": "0.30.0"}, {"threads": here["threads"] + 1}):
        assert targets.stored_here({**here, **changed}) is None, changed
    study = optuna.load_study(study_name="tiny", storage=url)
    for key, record in study.user_attrs.items():
        if key.startswith(CONFIRM_PREFIX):
            study.set_user_attr(key, {k: v for k, v in record.items() if k != "facts"})
    assert targets.stored_here(here) is not None
    assert targets.stored_here({**here, "torch": "2.0.0"}) is None
    # confirmations another host stored are not this device's: the pipeline loads to tell
    study = optuna.load_study(study_name="tiny", storage=url)
    for key, record in study.user_attrs.items():
        if key.startswith(CONFIRM_PREFIX):
            study.set_user_attr(key, {**record, "worker": "another-host:1"})
    fourth = confirm_reporting_diffusers(url, tmp_path)
    assert fourth.returncode == 0, fourth.stderr
    assert "diffusers loaded: True" in fourth.stdout and "(stored:" not in fourth.stdout


def confirm_reporting_diffusers(url: str, folder):
    """`optsearch study confirm` in a process that says at its end whether diffusers was loaded."""
    code = ("import sys; from optsearch.cli import main; code = main(['study', 'confirm', 'tiny', "
            f"'--storage', {url!r}, '--top', '3', '--quiet']); "
            "print('diffusers loaded:', 'diffusers' in sys.modules); sys.exit(code)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=folder,
                          timeout=600)


def psnr_on(spec, setting: dict, prompts: list[str], seed: int | None = None) -> Interval:
    """PSNR interval of a setting on `prompts` (from latent seed `seed`, by default the search's),
    measured in this process (bit-exact on CPU)."""
    evaluator = evaluator_from_spec(spec, prompts=prompts)
    if seed is not None:
        evaluator = evaluator.derive(config=dataclasses.replace(evaluator.config, seed=seed))
    comparison = evaluator.compare(setting, evaluator.baseline())
    return comparison.interval("psnr")


def winner_marks(url: str, tmp_path) -> tuple[int, int, str, str]:
    """The winner as show stars it, as the dashboard's study attr holds it, the study note, and
    what show printed."""
    study = optuna.load_study(study_name="tiny", storage=url)
    shown = optsearch_cmd("study", "show", "tiny", "--storage", url, cwd=tmp_path)
    starred = re.search(r"^\* winner: trial (\d+)", shown.stdout, re.MULTILINE)
    return int(starred.group(1)), study.user_attrs["winner"]["trial"], get_note(study), shown.stdout


def test_export_takes_the_confirmed_winner_never_one_infeasible_on_confirmation(tmp_path, tiny_pipe):
    """Under rule "bound", 8 search prompts give a tight interval and 2 unseen prompts a wide one:
    a limit between the two lower bounds makes the aggressive setting feasible in the search and
    infeasible on confirmation, while the faithful one passes both. Show, export and the
    dashboard's note name the same winner before confirmation and after."""
    text = (TINY_SPEC.replace("num_samples = 4", "num_samples = 8")
            .replace("n_trials = 4",
                     "n_trials = 2\nsampler = \"random\"\nwarm_start = []\nearly_stop = false")
            + "[confirm]\nnum_samples = 2\n[space.deepcache]\ncache_interval = [1, 8]\n"
            "[space.tome]\nratio = [0.0, 0.7]\n")
    draft = load_spec(write_spec(tmp_path / "draft.toml", text))
    search = psnr_on(draft, AGGRESSIVE, load_prompts("builtin", 8))
    unseen = psnr_on(draft, AGGRESSIVE, confirm_prompts(draft), confirm_seed(draft))
    faithful = psnr_on(draft, FAITHFUL, confirm_prompts(draft), confirm_seed(draft))
    assert unseen.low < faithful.low - 1 and faithful.low < search.low, \
        "the test needs a wide interval on 2 prompts, wider for the aggressive setting"
    limit = (unseen.low + faithful.low) / 2
    text = text.replace("limit = 30.0", f"limit = {limit}\nrule = \"bound\"")
    spec = write_spec(tmp_path / "tiny.toml", text)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    study = optuna.load_study(study_name="tiny", storage=url)
    study.enqueue_trial(AGGRESSIVE)
    study.enqueue_trial(FAITHFUL)
    run_worker(url, spec, tiny_pipe)
    trials = {t.number: t for t in study.get_trials()}
    assert all(objectives.is_feasible(t) for t in trials.values())
    assert trials[0].user_attrs["speedup"] > trials[1].user_attrs["speedup"]

    before = optsearch_cmd("study", "export", "tiny", "--storage", url, "-o", "unconfirmed.json",
                           cwd=tmp_path)
    assert before.returncode == 0 and "not confirmed" in before.stdout
    unconfirmed = json.loads((tmp_path / "unconfirmed.json").read_text())
    assert unconfirmed["best"]["trial"] == 0 and unconfirmed["best"]["confirmed"] is None
    # the spec left the size to the pipeline: the export records what it made (its native 32x32)
    assert unconfirmed["deployment"] == {"batch_size": 2, "height": 32, "width": 32,
                                         "num_inference_steps": 8, "scheduler": "DDIMScheduler",
                                         "guidance_scale": 7.5,
                                         "num_frames": None, "compile": "none",
                                         "device": device_name(torch.device("cpu")),
                                         "dtype": "float32", "offload": "none",
                                         "attention": None,  # a UNet: not dispatched
                                         "quantization": "none"}
    starred, marked, note, shown = winner_marks(url, tmp_path)
    assert starred == marked == 0 and note.startswith("## Winner: trial 0")
    assert "not confirmed yet" in unconfirmed["winner_rule"]
    # where the user's own repeat should read: the search interval sqrt(2) wider on the log scale
    repeat, searched = unconfirmed["repeat_speedup"], unconfirmed["best"]["metrics"]
    assert repeat["from"] == "search" and repeat["low"] < searched["speedup_low"]
    assert repeat["low"] == pytest.approx(
        searched["speedup"] * (searched["speedup_low"] / searched["speedup"]) ** 2 ** 0.5)
    told = (f"should read {repeat['low']:.2f}x-{repeat['high']:.2f}x (95%, from its search"
            if repeat["high"] / repeat["low"] <= 4 else  # a noisy search: said in words
            f"95% range {repeat['low']:.2f}x-{repeat['high']:.2f}x): `study confirm` measures it")
    assert told in shown

    confirmed = optsearch_cmd("study", "confirm", "tiny", "--storage", url, "--top", "2",
                              "--repeats", "2", "--quiet", cwd=tmp_path)
    assert confirmed.returncode == 0, confirmed.stderr
    records = {r["trial"]: r for r in stored_confirmations(url).values()}
    assert records[0]["feasible"] is False and records[1]["feasible"] is True
    assert records[0]["psnr"]["low"] == pytest.approx(unseen.low)

    after = optsearch_cmd("study", "export", "tiny", "--storage", url, "-o", "sp.json", cwd=tmp_path)
    assert after.returncode == 0, after.stderr
    best = json.loads((tmp_path / "sp.json").read_text())["best"]
    assert best["trial"] == 1
    starred, marked, note, shown = winner_marks(url, tmp_path)
    assert starred == marked == 1 and note.startswith("## Winner: trial 1")
    assert "deepcache(cache_interval=2" in shown.split("confirmations on unseen prompts")[1]
    check = best["confirmed"]
    assert check["feasible"] is True and check["num_samples"] == 2 and check["repeats"] == 2
    repeat = json.loads((tmp_path / "sp.json").read_text())["repeat_speedup"]
    assert repeat["from"] == "confirmation" and repeat["high"] > check["speedup_high"]
    assert check["prompts"] == confirm_prompts(load_spec(spec))
    assert set(check["psnr"]) == {"mean", "low", "high"}
    assert check["speedup_low"] <= check["speedup"] <= check["speedup_high"]

    # With only the aggressive setting confirmed, nothing is exported: exit 3, one line.
    optuna.delete_study(study_name="tiny", storage=url)
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    study = optuna.load_study(study_name="tiny", storage=url)
    study.enqueue_trial(AGGRESSIVE)
    run_worker(url, spec, tiny_pipe, n_trials=1)
    assert optsearch_cmd("study", "confirm", "tiny", "--storage", url, "--top", "1", "--repeats", "2",
                         "--quiet", cwd=tmp_path).returncode == 0
    refused = optsearch_cmd("study", "export", "tiny", "--storage", url, "-o", "none.json",
                            cwd=tmp_path)
    assert refused.returncode == 3
    assert "meets psnr (its confidence bound) >= quality.limit" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "none.json").exists()
