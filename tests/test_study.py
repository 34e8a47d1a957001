"""The study service with real processes and real storages (SQLite files, local PostgreSQL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

import optsearch
from optsearch.cli.show import format_summary, study_summary
from optsearch.formatting import format_speedup
from optsearch.measure.evaluate import image_digest
from optsearch.measure.generation import GenerationConfig, generate
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import load_prompts
from optsearch.optimize import create, objectives
from optsearch.optimize import study as studies
from optsearch.storage.notes import read_note
from optsearch.storage.rdb import open_storage
from tests.conftest import (
    OPTSEARCH,
    SLOW_SPEC,
    TINY_SPEC,
    optsearch_cmd,
    optsearch_process,
    sigint_default,
    storage_snapshot,
    write_spec,
)

# Integer-only space: few distinct settings, so two workers do propose the same one.
SMALL_SPACE = TINY_SPEC.replace("n_trials = 4", "n_trials = 6\nsampler = \"random\"") + """
[space.deepcache]
cache_interval = [2, 4]
cache_branch_id = [0, 1]
[space.tome]
ratio = [0.5]
max_downsample = [1]
"""


def load(url: str, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def worker(url: str, *extra: str, study: str = "tiny", line_by_line: bool = False):
    """A worker process beside the test (forked: tests/forked_cli.py); `line_by_line`: a new
    interpreter whose stdout the test reads as it prints."""
    argv = ("worker", "--study", study, "--storage", url, "--quiet", "--heartbeat-interval", "1",
            "--grace-period", "3", *extra)
    if not line_by_line:
        return optsearch_process(*argv)
    return subprocess.Popen([OPTSEARCH, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=sigint_default)


def evaluated_settings(study: optuna.Study) -> list[str]:
    return [json.dumps(t.user_attrs["setting"], sort_keys=True)
            for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
            if t.user_attrs.get("reused_from") is None]


def trials_told(study: optuna.Study) -> str:
    """Each trial's story, for a failed assertion about who measured what."""
    keys = ("worker", "reused_from", "setting", "fail_reason", "early_stop_reason")
    return "\n".join(f"{t.number} {t.state.name} {t.datetime_start} {t.datetime_complete} "
                     f"{ {k: t.user_attrs[k] for k in keys if k in t.user_attrs} } "
                     f"fixed={t.system_attrs.get('fixed_params')}" for t in study.trials)


def test_two_workers_share_a_postgres_study_each_against_its_own_baseline(tmp_path, pg_url):
    """Two worker processes on one PostgreSQL study: no setting evaluated twice, one baseline's
    images for the device, but each worker measures its trials against the baseline it timed."""
    # 28 settings: that one worker's three random draws all repeat settings measured already
    # (reused, not measured) is under 1 % likely; over SMALL_SPACE's 6 it happened in a suite run
    wide = SMALL_SPACE.replace("cache_interval = [2, 4]", "cache_interval = [2, 8]") \
        .replace("cache_branch_id = [0, 1]", "cache_branch_id = [0, 3]")
    spec = write_spec(tmp_path / "tiny.toml", wide)
    created = optsearch_cmd("study", "create", str(spec), "--storage", pg_url, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    assert "pw-not-checked" not in created.stdout + created.stderr and "***" in created.stdout
    # each worker's own limit is half the study: both measure trials, however busy the machine
    workers = [worker(pg_url, "--artifact-dir", str(tmp_path / "artifacts"), "--n-trials", "3")
               for _ in range(2)]
    outputs = [w.communicate(timeout=400) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs

    study = load(pg_url)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    settings = evaluated_settings(study)
    assert len(settings) == 6  # copies of a result are free: each worker measured its 3
    assert len(settings) == len(set(settings)), "a setting was evaluated twice"
    assert all("constraints" in t.user_attrs for t in finished)
    assert len(studies.baselines(study)) == 1  # same device fingerprint: one baseline images
    assert all(t.system_attrs.get("constraints") is not None for t in finished)

    # ... but each worker timed the baseline itself, and measured against it
    timings = {r["worker"]: r for r in studies.timings(study)}
    assert len(timings) == 2 and all(r["host"] and r["device_index"] == "cpu" for r in timings.values())
    # a worker that found the device's images stored made the very same ones (CPU: bit-exact)
    assert {r["timings"][0]["images_agree_psnr"] for r in timings.values()} <= {None, 100.0}
    measured = [t for t in finished if t.user_attrs.get("reused_from") is None]
    for trial in measured:
        own = timings[trial.user_attrs["worker"]]["timings"][0]["seconds_per_image"]
        assert trial.user_attrs["baseline_seconds_per_image"] == own
        if trial.state == TrialState.COMPLETE:
            assert 0 < trial.user_attrs["speedup_low"] <= trial.user_attrs["speedup"] \
                <= trial.user_attrs["speedup_high"]
    by_worker = {t.user_attrs["worker"]: t.user_attrs["baseline_seconds_per_image"] for t in measured}
    assert len(by_worker) == 2, "both workers measured trials"
    assert len(set(by_worker.values())) == 2, "two processes timed two different baselines"
    # early stop compares two trials' own seconds only when they share one baseline timing
    ids = {(t.user_attrs["worker"], t.user_attrs["baseline_id"]) for t in measured}
    assert len(ids) == 2 and len({baseline_id for _, baseline_id in ids}) == 2


def test_two_workers_exhaust_a_small_postgres_space_together(tmp_path, pg_url):
    """Two workers on a 6-setting space with n_trials 8: between them every setting is measured
    once, both stop when none is left (each says so), and nothing stays queued or running."""
    spec = write_spec(tmp_path / "tiny.toml", SMALL_SPACE.replace("n_trials = 6", "n_trials = 8"))
    assert optsearch_cmd("study", "create", str(spec), "--storage", pg_url, cwd=tmp_path).returncode == 0
    workers = [worker(pg_url, "--artifact-dir", str(tmp_path / "artifacts")) for _ in range(2)]
    outputs = [w.communicate(timeout=400) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = load(pg_url)
    settings = evaluated_settings(study)
    assert len(settings) == len(set(settings)) == 6, trials_told(study)  # each measured once
    assert [r["settings"] for r in studies.exhausted(study).values()] == [6]
    assert all("the space is exhausted: all 6 distinct computations" in out for out, _ in outputs)
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING, TrialState.FAIL))


def test_a_setting_waiting_in_the_queue_is_not_queued_again(tmp_path):
    """After a copy the worker queues an unmeasured computation; one already waiting in the queue
    (enqueued by a user, or by the last copy) is next in line anyway. Queuing it again made a
    second copy; and with only queued ones left the space is not exhausted yet."""
    from optsearch.optimize.sharing import queue_unmeasured
    from optsearch.study_spec import load_spec

    spec = load_spec(write_spec(tmp_path / "two.toml", TINY_SPEC.replace(
        'accelerators = ["deepcache", "tome"]', 'accelerators = [["deepcache"]]')
        + "[space.deepcache]\ncache_interval = [2, 3]\ncache_branch_id = [0]\n"))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/q.db")
    measured = {"deepcache": {"cache_interval": 2, "cache_branch_id": 0}}
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={
        "setting": measured, "fingerprint": "fp"}))
    study.enqueue_trial({"deepcache.cache_interval": 3, "deepcache.cache_branch_id": 0})

    def queue() -> bool:
        return queue_unmeasured(study, spec, "fp", {}, lambda setting, used: setting,
                                {"worker": "w", "device": "cpu"})

    assert queue() and len(study.get_trials(states=(TrialState.WAITING,))) == 1
    assert not studies.exhausted(study)
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={
        "setting": {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}, "fingerprint": "fp"}))
    for waiting in study.get_trials(states=(TrialState.WAITING,)):  # a worker took it
        study._storage.set_trial_state_values(waiting._trial_id, TrialState.FAIL)
    assert not queue() and [r["settings"] for r in studies.exhausted(study).values()] == [2]


def test_a_trial_waits_for_an_earlier_one_that_has_not_said_what_it_runs(tmp_path):
    """Two workers that start one setting at once: the later trial must not measure it again
    while the earlier has not yet written its setting (the race that once measured a setting
    twice in a 2-worker study). It waits, then copies the earlier result."""
    import threading

    from optsearch.optimize.sharing import earlier_result

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/race.db")
    setting = {"deepcache": {"cache_interval": 2, "cache_branch_id": 0}}
    first, second = study.ask(), study.ask()  # both RUNNING; the first has written nothing yet
    second.set_user_attr("setting", setting)
    second.set_user_attr("fingerprint", "fp")

    def first_writes_then_finishes() -> None:
        time.sleep(0.5)
        for key, value in {"setting": setting, "fingerprint": "fp", "constraints": [-1.0]}.items():
            first.set_user_attr(key, value)
        study.tell(first, 1.0)

    writer = threading.Thread(target=first_writes_then_finishes)
    writer.start()
    found = earlier_result(study, second, setting, "fp", poll_interval=0.1)
    writer.join()
    assert found is not None and found.number == first.number


def test_a_worker_yet_to_measure_tokens_knows_a_tome_setting_another_worker_measured(tmp_path):
    """ToMe's computation is told by the token counts a worker measures at its first ToMe trial.
    A worker that had not measured them keyed a setting by its parameters, the trial another
    worker had finished by its merged tokens: the two never met, and under load a 2-worker study
    measured one setting twice (the copy stopped as "same images"). Keyed in the device's
    recorded calibration, the setting is found, and a space it fills is exhausted."""
    from optsearch.accelerators import canonical_setting
    from optsearch.optimize.sharing import earlier_result, queue_unmeasured
    from optsearch.study_spec import load_spec

    spec = load_spec(write_spec(tmp_path / "one.toml", SMALL_SPACE.replace(
        "cache_interval = [2, 4]", "cache_interval = [2, 2]").replace(
        "cache_branch_id = [0, 1]", "cache_branch_id = [0, 0]")))
    setting = {"deepcache": {"cache_interval": 2, "cache_branch_id": 0},
               "tome": {"ratio": 0.5, "max_downsample": 1, "use_rand": True}}
    tokens = {"tome": {"latent_size": [8, 8], "tokens": {"1": 64}}}  # as the other worker measured

    def not_yet_measured(setting: dict, used: dict) -> dict:  # this worker's calibration: none
        return canonical_setting(setting, spec.model.steps, used)

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/tokens.db")
    study.add_trial(optuna.trial.create_trial(value=1.5, user_attrs={
        "setting": setting, "fingerprint": "fp", "calibration_used": tokens, "constraints": [-1.0]}))
    assert canonical_setting(setting, spec.model.steps, tokens) != setting  # keyed by tokens there
    found = earlier_result(study, study.ask(), setting, "fp", 0.1, not_yet_measured)
    assert found is not None and found.number == 0
    assert not queue_unmeasured(study, spec, "fp", {}, not_yet_measured, {"worker": "w", "device": "cpu"})
    assert not study.get_trials(states=(TrialState.WAITING,))  # nothing queued a second time


def test_a_trial_waiting_on_an_orphan_goes_on_once_the_grace_period_fails_it(tmp_path):
    """A worker killed between Optuna creating its trial and the trial's first heartbeat leaves
    an orphan: RUNNING, nothing written, no beat, so the heartbeat never fails it. A later trial
    waits for an earlier one that has not said what it runs; waiting on the orphan held the
    worker forever. Now each wait also fails orphans past the grace period, as between trials."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = write_spec(tmp_path / "tiny.toml", SMALL_SPACE.replace('sampler = "random"',
                                                                  'sampler = "random"\nwarm_start = []'))
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    orphan = load(url).ask()  # as if its worker died at once: RUNNING, no "worker", no beat
    # the worker times the orphan from when it first sees it, just before its own trial starts:
    # that trial waits on it for the grace period, however long the worker took to load
    process = worker(url, "--artifact-dir", str(tmp_path / "artifacts"), "--n-trials", "1",
                     "--grace-period", "6")
    try:
        _, err = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the worker waited on the orphan")
    assert process.returncode == 0, err
    failed, measured = load(url).get_trials()[orphan.number], load(url).get_trials()[1]
    assert failed.state == TrialState.FAIL and measured.state == TrialState.COMPLETE
    assert failed.datetime_complete > measured.datetime_start  # failed while the trial waited


def test_a_worker_waiting_on_another_workers_last_trial_says_which_and_goes_on_when_it_ends(tmp_path):
    """The study's last trial belongs to another worker, alive (it beats): this one waits, and
    says on which trial, whose, and for how long it has run (a silent one looked hung); then ends
    once that trial does."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC.replace("n_trials = 4", "n_trials = 1"))
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    storage = open_storage(url, heartbeat_interval=1, grace_period=3)
    study = optuna.load_study(study_name="tiny", storage=storage)
    held = study.ask()
    held.set_user_attr("worker", "gpu-7:4242")
    alive = threading.Event()

    def beat():
        while not alive.wait(0.5):
            storage.record_heartbeat(held._trial_id)

    storage.record_heartbeat(held._trial_id)  # it beats before the worker looks
    threading.Thread(target=beat, daemon=True).start()
    process = worker(url, "--artifact-dir", str(tmp_path / "artifacts"), line_by_line=True)
    try:
        lines = [process.stdout.readline()]  # the estimate first
        while "waiting for" not in lines[-1] and lines[-1] and len(lines) < 5:
            lines.append(process.stdout.readline())
        assert "waiting for the study's last trials, which other workers run: trial 0 (gpu-7:4242, " \
            "running " in lines[-1], lines
        study.tell(held, state=TrialState.PRUNED)  # the other worker's trial ends
        out, err = process.communicate(timeout=60)
    finally:
        alive.set()
        process.kill()
    assert process.returncode == 0, err
    assert "waiting for" not in out  # said once: the next notice would come 5 minutes later


def slow_study_with_worker(tmp_path, url: str) -> tuple[subprocess.Popen, optuna.Study]:
    """A study of few-second trials, and a worker process already running it."""
    spec = write_spec(tmp_path / "tiny.toml", SLOW_SPEC)
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    return worker(url, "--artifact-dir", str(tmp_path / "artifacts")), load(url)


def test_sigkill_then_restart_finishes_the_study(tmp_path, pg_url):
    process, study = slow_study_with_worker(tmp_path, pg_url)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        trials = study.get_trials(deepcopy=False)
        states = Counter(t.state for t in trials)
        measuring = [t for t in trials if t.state == TrialState.RUNNING and "setting" in t.user_attrs]
        if states[TrialState.COMPLETE] + states[TrialState.PRUNED] >= 1 and measuring:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the worker never got to a second trial")
    process.send_signal(signal.SIGKILL)  # mid-trial: its parameters are already sampled
    process.wait()
    killed = [t for t in study.get_trials() if t.state == TrialState.RUNNING][0]
    assert killed.params
    done_before = {t.number for t in study.get_trials() if t.state == TrialState.COMPLETE}

    restarted = worker(pg_url, "--artifact-dir", str(tmp_path / "artifacts"))
    out, err = restarted.communicate(timeout=400)
    assert restarted.returncode == 0, err
    trials = study.get_trials()
    assert len(studies.measured_trials(study)) == 4  # a repeat's free copy is no trial of n_trials
    assert next(t for t in trials if t.number == killed.number).state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert done_before <= {t.number for t in trials if t.state == TrialState.COMPLETE}
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_sigint_fails_requeues_and_exits_130(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    process, study = slow_study_with_worker(tmp_path, url)
    deadline = time.monotonic() + 300
    while not [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING
               and "setting" in t.user_attrs]:  # being measured, not just created
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(failed) == 1 and len(waiting) == 1 and waiting[0].params == failed[0].params
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_create_conflicts_leave_the_storage_unchanged(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC)
    created = optsearch_cmd("study", "create", str(spec), "--storage", url)
    assert created.returncode == 0
    assert "note: prompts.num_samples = 4 in batches of 2 is 2 batches a pass" in created.stdout
    before = storage_snapshot(url)

    again = optsearch_cmd("study", "create", str(spec), "--storage", url)
    assert again.returncode == 2 and "already exists" in again.stderr
    other = write_spec(tmp_path / "other.toml", TINY_SPEC.replace("steps = 8", "steps = 9"))
    different = optsearch_cmd("study", "create", str(other), "--storage", url, "--name", "tiny",
                              "--load-if-exists")
    assert different.returncode == 2 and "different spec (differs in: model.steps)" in different.stderr
    assert storage_snapshot(url) == before

    same = optsearch_cmd("study", "create", str(spec), "--storage", url, "--load-if-exists")
    assert same.returncode == 0
    assert storage_snapshot(url) == before
    for result in (again, different):
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_export_then_apply_reproduces_the_trial_images(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec_path = write_spec(tmp_path / "tiny.toml", TINY_SPEC.replace("limit = 30.0", "limit = 5.0"))
    result = optsearch_cmd("run", str(spec_path), "--storage", url, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "best feasible trial per combo" in result.stdout
    export = optsearch_cmd("study", "export", "tiny", "--storage", url, "-o", "sp.json", cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    exported = json.loads((tmp_path / "sp.json").read_text())
    assert exported["format"] == "optsearch.search_params/1"
    assert exported["baseline"]["seconds_per_image"] > 0 and exported["spec"]["name"] == "tiny"
    trial = load(url).trials[exported["best"]["trial"]]

    spec = optsearch.load_spec(spec_path)
    pipe = load_pipeline("builtin:tiny", device="cpu", dtype="float32")  # a fresh pipeline
    prompts = load_prompts("builtin", spec.prompts.num_samples)
    with optsearch.apply(pipe, tmp_path / "sp.json") as applied:
        batches = generate(pipe, prompts, GenerationConfig.from_spec(spec), setting=applied,
                           warmup=False)
        digests = [image_digest(image) for batch in batches for image in batch.images]
    assert digests == trial.user_attrs["image_digests"]


def test_export_without_feasible_trial_exits_3(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC)
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    result = optsearch_cmd("study", "export", "tiny", "--storage", url, "-o", str(tmp_path / "x.json"))
    assert result.returncode == 3 and "'tiny' has no measured trial yet: start a worker" in result.stderr
    assert not (tmp_path / "x.json").exists()


KNOWN = [  # (combo, speedup, clip_loss): limit 0.3, target speedup 2.0
    ("deepcache", 2.5, 0.20),
    ("deepcache", 3.0, 0.50),   # fastest, but infeasible in max-speedup
    ("deepcache+tome", 2.8, 0.25),  # best max-speedup
    ("deepcache+tome", 1.8, 0.01),  # best loss, but too slow for target 2.0
    ("deepcache+tome", 2.1, 0.05),  # best target-speedup
]


@pytest.mark.parametrize("mode, expected", [("max-speedup", 2), ("target-speedup", 4),
                                            ("pareto", 2)])
def test_best_trial_of_known_study(tmp_path, mode, expected):
    from optsearch.storage.rdb import open_storage
    from optsearch.study_spec import spec_from_dict

    spec = spec_from_dict({"name": "known", "quality": {"metric": "clip_loss", "limit": 0.3},
                           "objective": {"mode": mode, "target_speedup": 2.0},
                           "search": {"accelerators": "any"}})
    storage = open_storage(f"sqlite:///{tmp_path / 'known.db'}", heartbeat_interval=None)
    study = create.create_study(spec, storage)
    for combo, speedup, loss in KNOWN:
        trial = study.ask()
        summary = {"speedup": speedup, "clip_loss": {"mean": loss}}
        values = objectives.constraints(spec, summary)
        for key, value in values.items():
            trial.set_constraint(key, value)
        trial.set_user_attr("constraints", values)
        trial.set_user_attr("combo", combo)
        trial.set_user_attr("setting", {})
        trial.set_user_attr("speedup", speedup)
        trial.set_user_attr("clip_loss", loss)
        study.tell(trial, objectives.objective_values(spec, summary))
    best = objectives.best_overall(study, spec)
    assert best.number == expected
    if mode == "pareto":  # feasible front: (2.8, 0.25), (2.5, 0.20), (2.1, 0.05)... (1.8, 0.01)
        assert [t.number for t in objectives.pareto_front(study, spec)] == [2, 0, 4, 3]
    shown = format_summary(study_summary(study, spec)).splitlines()
    fronts = [i for i, line in enumerate(shown) if line.startswith("pareto front")]
    if mode == "pareto":  # study show prints the trade-off the user asked for, fastest first
        rows = [line.split()[:4] for line in shown[fronts[0] + 3:]]
        assert rows == [["2", "deepcache+tome", "2.80", "(one"], ["0", "deepcache", "2.50", "(one"],
                        ["4", "deepcache+tome", "2.10", "(one"], ["3", "deepcache+tome", "1.80", "(one"]]
        assert [line.split("batch: no interval)")[1].split()[0] for line in shown[fronts[0] + 3:]] \
            == ["0.250", "0.200", "0.050", "0.010"]
        assert any(line.startswith("* winner: trial 2,") and "the fastest of the front" in line
                   for line in shown)
    else:
        assert fronts == []
    if mode != "pareto":  # Optuna agrees (it reads the constraints from storage)
        assert study.best_trial.number == expected
    per_combo = objectives.best_per_combo(study, spec)
    assert set(per_combo) == {"deepcache", "deepcache+tome"}


def test_study_show_list_delete(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC.replace("n_trials = 4", "n_trials = 2"))
    assert optsearch_cmd("run", str(spec), "--storage", url, "--quiet", cwd=tmp_path).returncode == 0
    shown = optsearch_cmd("study", "show", "tiny", "--storage", url, "--json")
    data = json.loads(shown.stdout)
    assert data["finished"] == 2 and len(data["baselines"]) == 1
    assert data["baselines"][0]["seconds_per_image"] > 0
    # the winner says what its figures hold for, as the export records it
    assert data["winner_deployment"]["batch_size"] == 2 and data["winner_deployment"]["dtype"] == "float32"
    assert "\n  measured at batch 2, 32x32, 8 steps (DDIMScheduler), guidance 7.5: serve at it" \
        in format_summary(data)
    listed = optsearch_cmd("study", "list", "--storage", url).stdout.splitlines()
    assert listed[0].split()[:5] == ["study", "measured", "queued", "failed", "n_trials"]
    row = next(line.split() for line in listed if line.startswith("tiny"))
    assert row[1] == "2" and row[3] == "0" and row[4] == "2"  # finished, failed, n_trials
    best = data["best"]  # the published warm starts meet psnr 30 at 2x and more
    assert f"trial {best['trial']}: {format_speedup(best)} search" in listed[-1]  # with its interval
    assert optsearch_cmd("study", "delete", "tiny", "--storage", url).returncode == 0
    assert "no studies" in optsearch_cmd("study", "list", "--storage", url).stdout


def test_env_var_storage_and_default(tmp_path):
    spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC)
    env = {**os.environ, "OPTSEARCH_STORAGE": f"sqlite:///{tmp_path / 'env.db'}"}
    assert optsearch_cmd("study", "create", str(spec), env=env).returncode == 0
    assert (tmp_path / "env.db").exists()
    env.pop("OPTSEARCH_STORAGE")
    assert optsearch_cmd("study", "create", str(spec), cwd=tmp_path, env=env).returncode == 0
    assert (tmp_path / "optsearch.db").exists()


def test_reused_setting_copies_the_result(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = write_spec(tmp_path / "tiny.toml", SMALL_SPACE.replace("n_trials = 6", "n_trials = 8"))
    result = optsearch_cmd("run", str(spec), "--storage", url, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = load(url)
    reused = [t for t in study.trials if t.user_attrs.get("reused_from") is not None]
    assert reused, "a sampler drawing from 6 settings for 8 trials must repeat one"  # pigeonhole
    for trial in reused:
        original = study.trials[trial.user_attrs["reused_from"]]
        assert trial.user_attrs["setting"] == original.user_attrs["setting"]
        assert trial.state == original.state and trial.values == original.values
    # copies take no trial of n_trials: every setting of the space is measured, once, and then
    # the study ends, saying so, rather than copying results until 8 trials have finished
    assert sorted(evaluated_settings(study)) == sorted(set(evaluated_settings(study)))
    assert len(evaluated_settings(study)) == 6
    assert [r["settings"] for r in studies.exhausted(study).values()] == [6]
    assert "the space is exhausted: all 6 distinct computations are tried on cpu" in result.stdout
    assert "fewer than n_trials 8" in result.stdout
    assert "6/8 trials measured" in result.stdout
    # and the dashboard's study note says why the study stopped short of n_trials
    assert "## Search\n\n- the space is exhausted: all 6 distinct computations" in read_note(study, None)
    assert ": 6 trials to go; estimate: 6 trials x 4 prompts" in result.stdout  # not n_trials 8
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING, TrialState.FAIL))
    # a worker joining later finds nothing to do on this device, and times no baseline for it
    again = optsearch_cmd("worker", "--study", "tiny", "--storage", url, "--quiet", cwd=tmp_path)
    assert again.returncode == 0 and "worker done: 0 trials measured" in again.stdout, again.stderr
    assert "the space is exhausted" in again.stdout and len(load(url).trials) == len(study.trials)
    assert len(studies.timings(load(url))) == len(studies.timings(study))
    listed = optsearch_cmd("study", "list", "--storage", url).stdout  # done, though 6 < n_trials 8
    assert "6 (space exhausted)" in next(line for line in listed.splitlines() if line.startswith("tiny"))
    as_json = json.loads(optsearch_cmd("study", "list", "--storage", url, "--json").stdout)
    assert [(s["study"], s["measured"], s["exhausted"], s["n_trials"]) for s in as_json] == [
        ("tiny", 6, True, 8)]
    assert as_json[0]["winner"] == study.user_attrs["winner"]  # the mark every worker updates
    # when its first trial started, in UTC as its worker wrote it (not a machine's local time)
    first = min(t.user_attrs["started"] for t in study.trials if "started" in t.user_attrs)
    assert as_json[0]["started"] == first and first.endswith("+00:00")
    assert f"{first[:19].replace('T', ' ')} UTC" in listed
    exported = optsearch_cmd("study", "export", "tiny", "--storage", url, "-o", str(tmp_path / "p.json"))
    assert exported.returncode == 0, exported.stderr  # the answer rests on every setting
    assert json.loads((tmp_path / "p.json").read_text())["search"] == {
        "n_trials": 8, "space_size": 6, "measured": 6, "exhausted": True}
    extended = optsearch_cmd("study", "extend", "tiny", "--n-trials", "10", "--storage", url)
    assert extended.returncode == 0 and "n_trials 8 -> 10 (6 measured)" in extended.stdout
    assert "note: the space is exhausted: all 6 distinct computations are tried on cpu" in extended.stdout


def test_a_repeat_takes_no_trial_of_n_trials(tmp_path):
    """A sampler that repeats a measured setting copies its result for free; the study still
    measures n_trials distinct settings (it measured fewer, the repeats counted, before)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    spec = write_spec(tmp_path / "tiny.toml",
                      SMALL_SPACE.replace("n_trials = 6", "n_trials = 5\nseed = 3\nwarm_start = []"))
    result = optsearch_cmd("run", str(spec), "--storage", url, "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    study = load(url)
    assert any(t.user_attrs.get("reused_from") is not None for t in study.trials), \
        "seed 3 repeats a setting (the premise of this test)"
    assert len(evaluated_settings(study)) == len(set(evaluated_settings(study))) == 5
    assert not studies.exhausted(study) and "5/5 trials measured" in result.stdout


def test_image_digests_name_each_prompts_image_whatever_the_batch(tiny_pipe):
    """What a trial records as `image_digests` identifies each prompt's image: the same at any
    batch size (per-prompt seeds), different between prompts, and changed by one pixel level."""
    prompts = load_prompts("builtin", 3)
    by_batch = {}
    for batch_size in (1, 2):
        config = GenerationConfig(steps=4, batch_size=batch_size)
        images = np.concatenate([b.images for b in generate(tiny_pipe, prompts, config, warmup=False)])
        by_batch[batch_size] = [image_digest(image) for image in images]
    assert by_batch[1] == by_batch[2] and len(set(by_batch[1])) == 3
    changed = images[0].copy()
    changed[0, 0, 0] ^= 1
    assert image_digest(changed) != by_batch[1][0]


def test_the_trial_bar_ends_at_what_this_worker_finished(tmp_path):
    """A worker stopped by its own --n-trials: its progress bar's last state counts the trial it
    just finished (it showed the count from before it)."""
    spec = write_spec(tmp_path / "t.toml", TINY_SPEC)
    result = optsearch_cmd("run", str(spec), "--storage", f"sqlite:///{tmp_path}/b.db",
                           "--n-trials", "1")
    assert result.returncode == 0, result.stderr
    states = [part for part in result.stderr.replace("\r", "\n").splitlines()
              if part.startswith("trials tiny:")]
    assert " 1/4 " in states[-1], states[-3:]
