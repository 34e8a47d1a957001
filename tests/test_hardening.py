"""A new user's first hour: secrets, seeds across workers, one worker per device, typos that fail
loudly and early. Each test failed before the fix it names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from optsearch.optimize import space
from optsearch.optimize import study as studies
from optsearch.storage.masking import encode_password, mask_text, mask_url
from optsearch.storage.rdb import open_storage
from optsearch.storage.record import is_copy
from optsearch.study_spec import load_spec
from tests.conftest import (
    SLOW_SPEC,
    TINY_SPEC,
    ForkedProcess,
    optsearch_cmd,
    optsearch_process,
    write_spec,
)

SPECIAL = "Tr0ub@dor&3/x:y?z"


@pytest.mark.parametrize("url", [
    f"postgresql+psycopg://postgres:{SPECIAL}@127.0.0.1:1/x",
    "postgresql+psycopg://postgres@127.0.0.1:1/x?password=Tr0ub@dor&3/x:y?z",
])
def test_no_part_of_a_special_password_is_printed(url, tmp_path):
    result = optsearch_cmd("study", "list", "--storage", url, cwd=tmp_path)
    assert result.returncode == 75, result.stderr  # nothing listens there: "try again"
    output = result.stdout + result.stderr
    for piece in ("Tr0ub", "dor&3", "x:y"):
        assert piece not in output, output
    assert "***" in output and len(result.stderr.strip().splitlines()) == 1


def test_masking_and_encoding_of_unencoded_passwords():
    url = f"postgresql+psycopg://postgres:{SPECIAL}@db:5432/x"
    assert mask_url(url) == "postgresql+psycopg://postgres:***@db:5432/x"
    assert encode_password(url) == "postgresql+psycopg://postgres:Tr0ub%40dor%263%2Fx%3Ay%3Fz@db:5432/x"
    # a driver echoing a fragment after the URL was seen
    assert "dor&3" not in mask_text("could not resolve host 'dor&3@db'")


def test_a_librarys_logged_exception_is_one_masked_line():
    """SQLAlchemy logs "Exception closing cursor" with its traceback when Ctrl-C cuts a query off
    (seen in test_sigint_fails_requeues_and_exits_130): the CLI's log lines stay one line."""
    import io
    import logging

    from optsearch.cli.main import _mask_record, _one_line_record

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_one_line_record)
    handler.addFilter(_mask_record)
    logger = logging.getLogger("sqlalchemy.pool.test")
    logger.addHandler(handler)
    try:
        try:
            raise ConnectionError(f"lost postgresql://postgres:{SPECIAL}@db/x")
        except ConnectionError:
            logger.error("Exception closing cursor", exc_info=True)
    finally:
        logger.removeHandler(handler)
    [line] = stream.getvalue().splitlines()
    assert line.startswith("ERROR sqlalchemy.pool.test: Exception closing cursor (ConnectionError: lost")
    assert "Traceback" not in line and "Tr0ub" not in line and "***" in line


def test_password_file_is_read_and_never_shown(tmp_path, pg_url):
    password_file = tmp_path / "pw"
    password_file.write_text("any@odd:pass/word\n")
    url = pg_url.replace("postgres:pw-not-checked@", "postgres@")
    env = {"OPTSEARCH_STORAGE_PASSWORD_FILE": str(password_file), "PATH": "/usr/bin:/bin"}
    created = optsearch_cmd("study", "create", str(write_spec(tmp_path / "t.toml", TINY_SPEC)),
                            "--storage", url, env=env)
    assert created.returncode == 0, created.stderr  # trust auth: any password connects
    assert "odd" not in created.stdout + created.stderr
    missing = optsearch_cmd("study", "list", "--storage", url,
                            env={**env, "OPTSEARCH_STORAGE_PASSWORD_FILE": str(tmp_path / "nope")})
    assert missing.returncode == 2 and "OPTSEARCH_STORAGE_PASSWORD_FILE" in missing.stderr


def test_a_cloud_databases_postgres_url_works_and_a_missing_driver_is_named(tmp_path, pg_url):
    """postgres:// (what Heroku, Supabase or Render hand out; SQLAlchemy dropped the name) opens
    PostgreSQL through psycopg; a driver that is not installed is named, with what is."""
    cloud = pg_url.replace("postgresql+psycopg://", "postgres://")
    created = optsearch_cmd("study", "create", str(write_spec(tmp_path / "t.toml", TINY_SPEC)),
                            "--storage", cloud)
    assert created.returncode == 0, created.stderr
    row = optsearch_cmd("study", "list", "--storage", pg_url).stdout.splitlines()[-1].split()
    assert row[0] == "tiny" and row[-3:] == ["builtin:tiny", "-", "-"]  # no winner, not started
    other = optsearch_cmd("study", "list", "--storage", "mysql://u:secret@127.0.0.1/db")
    assert other.returncode == 2 and "secret" not in other.stderr
    assert other.stderr.strip() == (
        "optsearch: error: cannot open storage mysql://u:***@127.0.0.1/db: no driver for mysql "
        "here: optsearch installs SQLite's and psycopg (postgresql+psycopg://, or postgresql://)")
    unknown = optsearch_cmd("study", "list", "--storage", "redis://:secret@127.0.0.1")  # no RDB
    assert unknown.returncode == 2 and unknown.stderr.strip() == (
        "optsearch: error: cannot open storage redis://:***@127.0.0.1: redis:// is not a database "
        "SQLAlchemy knows: give sqlite:///FILE, postgresql://..., or a storage proxy's grpc://host:port")


def test_another_apps_database_is_never_written(tmp_path, pg_url):
    """--storage naming an app's database by mistake: no command adds Optuna's tables to it (nor
    switches its SQLite file to WAL); one line, exit 2. On PostgreSQL only the read commands
    refuse: creating a study in a shared database with other tables is Optuna's normal use."""
    import sqlite3

    import psycopg
    import sqlalchemy

    app = tmp_path / "app.db"
    with sqlite3.connect(app) as connection:
        connection.execute("CREATE TABLE users (id INTEGER, name TEXT)")
    before = app.read_bytes()
    spec = str(write_spec(tmp_path / "t.toml", TINY_SPEC))
    for command in (["study", "list"], ["study", "show", "tiny"], ["worker", "--study", "tiny"],
                    ["study", "create", spec], ["run", spec]):
        result = optsearch_cmd(*command, "--storage", f"sqlite:///{app}")
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr == (f"optsearch: error: sqlite:///{app} is not an optsearch storage: its "
                                 "database holds other tables (users) and none of Optuna's; nothing "
                                 "was written (check --storage or $OPTSEARCH_STORAGE)\n")
    assert app.read_bytes() == before and not (tmp_path / "app.db-wal").exists()

    with psycopg.connect(pg_url.replace("+psycopg", "").replace(":pw-not-checked", ""),
                         autocommit=True) as connection:
        connection.execute("CREATE TABLE orders (id INTEGER)")
    listed = optsearch_cmd("study", "list", "--storage", pg_url)
    assert listed.returncode == 2 and "holds other tables (orders)" in listed.stderr
    assert sqlalchemy.inspect(sqlalchemy.create_engine(pg_url)).get_table_names() == ["orders"]
    assert optsearch_cmd("study", "create", spec, "--storage", pg_url).returncode == 0


@pytest.mark.parametrize("command", [["study", "list"], ["study", "show", "x"],
                                     ["study", "export", "x"], ["study", "plot", "x", "-o", "p"],
                                     ["worker", "--study", "x"], ["study", "confirm", "x"]])
def test_read_commands_never_create_a_storage(tmp_path, command):
    result = optsearch_cmd(*command, "--storage", "sqlite:///typo_path.db", cwd=tmp_path)
    assert result.returncode == 2
    assert f"no storage at {tmp_path / 'typo_path.db'}" in result.stderr
    assert not (tmp_path / "typo_path.db").exists()


@pytest.mark.parametrize("args, message", [
    (["--device", "gpu"], "unknown device 'gpu' (allowed: auto, cpu, cuda, cuda:N)"),
    (["--timeout", "0"], "must be > 0"),
    (["--heartbeat-interval", "0"], "must be >= 1"),
    (["--heartbeat-interval", "30", "--grace-period", "2"],
     "--grace-period 2 must be at least twice --heartbeat-interval 30"),
    (["--devices", "all"], "--devices all: no CUDA device here"),
    (["--devices", "cpu,gpu"], "unknown device 'gpu'"),
])
def test_worker_values_are_checked_like_spec_values(tmp_path, args, message):
    result = optsearch_cmd("worker", "--study", "x", *args, "--storage", f"sqlite:///{tmp_path}/a.db")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sets, message", [
    (["tgate.gate_step=4"], "--set: the setting is tgate, which this spec does not search "
                            "(search.accelerators gives: deepcache+tome)"),
    (["deepcache.cache_interval=20"], "deepcache.cache_interval=20 must be <= 8 (model.steps)"),
])
def test_evaluate_set_names_the_specs_combos_and_fits_the_steps(tmp_path, sets, message):
    spec = write_spec(tmp_path / "t.toml", TINY_SPEC)
    result = optsearch_cmd("evaluate", str(spec), *(f"--set={s}" for s in sets), "--quiet")
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_relative_paths_are_read_from_the_specs_folder(tmp_path):
    folder = tmp_path / "nc"
    folder.mkdir()
    (folder / "prompts.txt").write_text("a red bus\na small cat\nthe sea at night\na tree\n")
    text = TINY_SPEC.replace('source = "builtin"', 'source = "prompts.txt"') \
        .replace("n_trials = 4", "n_trials = 1") + '[artifacts]\npath = "art"\n'
    write_spec(folder / "spec.toml", text)
    url = f"sqlite:///{tmp_path / 's.db'}"
    ran = optsearch_cmd("run", "nc/spec.toml", "--storage", url, "--quiet", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    stored = optuna.load_study(study_name="tiny", storage=url).user_attrs[studies.SPEC_ATTR]
    assert stored["prompts"]["source"] == str(folder / "prompts.txt")
    assert stored["artifacts"]["path"] == str(folder / "art") and (folder / "art").is_dir()
    write_spec(folder / "bad.toml", text.replace("prompts.txt", "missing.txt"))
    refused = optsearch_cmd("study", "create", "nc/bad.toml", "--storage", url, cwd=tmp_path)
    assert refused.returncode == 2
    assert f"prompts.source: file {folder / 'missing.txt'} does not exist" in refused.stderr
    # ControlNets and LoRAs beside the spec too: a worker started elsewhere finds the same ones
    served = load_spec(write_spec(folder / "served.toml", text.replace(
        'id = "builtin:tiny"', 'id = "./sd"\ncontrolnet = ["./canny", "../depth"]\n'
        'lora = ["./ink.safetensors", "/loras/b"]').replace("batch_size = 2", "batch_size = 1")))
    assert served.model.controlnet == [str(folder / "canny"), str(tmp_path / "depth")]
    assert served.model.lora == [str(folder / "ink.safetensors"), "/loras/b"]


def test_offline_clip_weights_fail_fast_in_one_line(tmp_path):
    spec = write_spec(tmp_path / "t.toml", TINY_SPEC.replace('clip_model = "builtin:tiny"',
                                                             'clip_model = "ViT-B-32"')
                      .replace('clip_pretrained = "none"', 'clip_pretrained = "laion2b_s34b_b79k"'))
    result = optsearch_cmd("evaluate", str(spec), "--quiet",
                           env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
                                "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    assert "CLIP weights ViT-B-32/laion2b_s34b_b79k" in result.stderr
    # said by the check before open_clip's download (which retries for a minute), in one line
    assert "HF_HUB_OFFLINE is set" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_finished_study_worker_exits_at_once_and_messages_name_the_constraint(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    text = TINY_SPEC.replace("n_trials = 4", "n_trials = 1\nwarm_start = []") + \
        '[objective]\nmode = "target-speedup"\ntarget_speedup = 100.0\n'
    spec = write_spec(tmp_path / "t.toml", text)
    empty = optsearch_cmd("study", "create", str(spec), "--storage", url)
    assert empty.returncode == 0
    shown = optsearch_cmd("study", "show", "tiny", "--storage", url)
    assert "trials: none yet" in shown.stdout
    assert "feasible when speedup >= objective.target_speedup = 100.0" in shown.stdout
    assert optsearch_cmd("worker", "--study", "tiny", "--storage", url, "--quiet").returncode == 0
    again = optsearch_cmd("worker", "--study", "tiny", "--storage", url, "--quiet")
    assert again.returncode == 0 and "is complete: 1 of 1 trials measured" in again.stdout
    exported = optsearch_cmd("study", "export", "tiny", "--storage", url, "-o", str(tmp_path / "x"))
    assert exported.returncode == 3
    assert "objective.target_speedup" in exported.stderr and "quality.limit" not in exported.stderr


def test_export_carries_the_prompts_seeds_and_digests(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = write_spec(tmp_path / "t.toml", TINY_SPEC.replace("n_trials = 4", "n_trials = 1")
                      .replace("limit = 30.0", "limit = 5.0"))
    assert optsearch_cmd("run", str(spec), "--storage", url, "--quiet", cwd=tmp_path).returncode == 0
    assert optsearch_cmd("study", "export", "tiny", "--storage", url, "-o", "sp.json",
                         cwd=tmp_path).returncode == 0
    exported = json.loads((tmp_path / "sp.json").read_text())
    trial = optuna.load_study(study_name="tiny", storage=url).trials[exported["best"]["trial"]]
    assert exported["best"]["image_digests"] == trial.user_attrs["image_digests"]
    assert len(exported["prompts"]["texts"]) == len(exported["prompts"]["seeds"]) == 4
    assert exported["prompts"]["seeds"][1] == exported["prompts"]["seeds"][0] + 1


SEEDED = TINY_SPEC.replace("n_trials = 4", 'n_trials = 6\nsampler = "random"\nseed = 7\nwarm_start = []'
                           "\nearly_stop = false")


def test_seeded_workers_in_parallel_and_resumed_draw_no_setting_twice(tmp_path, pg_url):
    """Two seeded workers at once, then a worker resumed on the same study: six different
    settings, none reused; and the seed still makes the study reproducible."""
    spec = write_spec(tmp_path / "t.toml", SEEDED)
    assert optsearch_cmd("study", "create", str(spec), "--storage", pg_url).returncode == 0
    workers = [optsearch_process("worker", "--study", "tiny", "--storage", pg_url, "--quiet",
                                 "--n-trials", "2", "--artifact-dir", str(tmp_path / "art"))
               for _ in range(2)]
    assert [w.wait(timeout=400) for w in workers] == [0, 0]
    resumed = optsearch_cmd("run", str(spec), "--storage", pg_url, "--quiet", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    trials = optuna.load_study(study_name="tiny", storage=pg_url).get_trials(
        states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(trials) == 6 and not [t for t in trials if t.user_attrs.get("reused_from") is not None]
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 6
    # ... and the seed still makes the study reproducible: the same first draws again
    other = f"sqlite:///{tmp_path / 'again.db'}"
    assert optsearch_cmd("study", "create", str(spec), "--storage", other).returncode == 0
    again, seeded = studies.load_study(open_storage(other, heartbeat_interval=None), "tiny")
    trial = again.ask()
    space.suggest_setting(trial, seeded)
    first = min(trials, key=lambda t: t.number)
    assert trial.params == first.params


def worker_in_a_trial(tmp_path, n_trials: int = 3) -> tuple[str, ForkedProcess, list]:
    """A study of n_trials and one worker process, returned once its first trial runs."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = write_spec(tmp_path / "t.toml", SLOW_SPEC.replace("n_trials = 4", f"n_trials = {n_trials}"))
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    worker = optsearch_process("worker", "--study", "tiny", "--storage", url, "--quiet", cwd=tmp_path)
    study = optuna.load_study(study_name="tiny", storage=url)
    deadline = time.monotonic() + 300
    while True:
        running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if "setting" in t.user_attrs]
        if running:
            return url, worker, running
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.1)


def test_a_worker_whose_trial_another_failed_goes_on(tmp_path):
    url, worker, running = worker_in_a_trial(tmp_path)
    study = optuna.load_study(study_name="tiny", storage=url)
    # what another worker's stale-heartbeat check does: fail the trial and re-queue it
    study._storage.set_trial_state_values(running[0]._trial_id, TrialState.FAIL)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err
    assert "was ended (FAIL) by another worker" in err
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len([t for t in finished if not is_copy(t)]) == 3  # copies are free


def test_a_worker_whose_study_is_deleted_stops_with_one_line(tmp_path):
    # many trials, deleted in this process at once: under load the worker had finished a short
    # study while a `study delete` command was still importing
    url, worker, _ = worker_in_a_trial(tmp_path, n_trials=20)
    optuna.delete_study(study_name="tiny", storage=url)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 2, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        "optsearch: error: study 'tiny' was deleted while this worker ran; its running trial is lost, "
        "the worker stops")


def test_devices_runs_one_worker_per_device_and_one_ctrl_c_stops_all(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = write_spec(tmp_path / "t.toml", SLOW_SPEC.replace("n_trials = 4", "n_trials = 20"))
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    parent = optsearch_process("worker", "--study", "tiny", "--storage", url, "--quiet",
                               "--devices", "cpu,cpu", cwd=tmp_path, new_session=True)
    try:
        study = optuna.load_study(study_name="tiny", storage=url)
        deadline = time.monotonic() + 300
        while len(studies.timings(study)) < 2 or not study.get_trials(states=(TrialState.RUNNING,)):
            assert time.monotonic() < deadline and parent.poll() is None, parent.communicate()
            time.sleep(0.2)
            study = optuna.load_study(study_name="tiny", storage=url)
        parent.send_signal(signal.SIGINT)
        _, err = parent.communicate(timeout=120)
    finally:  # a failure must not leave workers running under the tests that follow
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
    assert parent.returncode == 130, err
    timings = studies.timings(study)
    assert len({record["worker"] for record in timings}) == 2, err  # two processes, two baselines
    running = [(trial.number, trial.datetime_start, trial.user_attrs)
               for trial in study.get_trials(states=(TrialState.RUNNING,))]
    assert not running, (running, err)  # every running trial re-queued
    assert "Traceback" not in err
    assert err.startswith("warning: 2 CPU workers share this machine's")  # said before they start


def test_a_gpu_named_twice_in_devices_is_warned_of_like_shared_cpu_cores():
    """`--devices 0,0` starts two workers on one GPU, timing each other's kernels: said, as two
    CPU workers on one machine are (parse_devices needs the GPUs themselves; the fleet's warning
    is what the parent prints before it starts them)."""
    from optsearch.optimize.fleet import shared_device_warning

    assert shared_device_warning(["cuda:0", "cuda:1"]) is None
    assert shared_device_warning(["cuda:0", "cuda:1", "cuda:0"]).startswith(
        "warning: cuda:0 named more than once: workers sharing a GPU time each other's kernels")
    assert shared_device_warning(["cpu", "cpu"]).startswith("warning: 2 CPU workers share")
    both = shared_device_warning(["cpu", "cuda:1", "cpu", "cuda:1"]).splitlines()
    assert len(both) == 2 and both[1].startswith("warning: cuda:1 named more than once")


def two_trial_worker(tmp_path):
    """A worker, in this process, of a new two-trial study of the tiny UNet."""
    from optsearch.optimize.worker import Worker, WorkerOptions

    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = write_spec(tmp_path / "t.toml", TINY_SPEC.replace("n_trials = 4", "n_trials = 2\nwarm_start = []"))
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    return Worker(url, "tiny", WorkerOptions(progress=False, artifact_dir=str(tmp_path / "art")))


def test_an_interrupt_while_optuna_creates_the_trial_fails_and_requeues_it(tmp_path):
    """CI once found a trial left RUNNING after one Ctrl-C: the signal came after Optuna created
    the trial and before the objective had it. A real SIGTERM sent at that point (the sampler's
    before_trial hook, inside study.ask) is held until the objective runs, which fails the trial
    and queues it again."""
    worker = two_trial_worker(tmp_path)
    sampler = worker.study.sampler
    before_trial = sampler.before_trial

    def interrupted_before_trial(study, trial):
        before_trial(study, trial)
        os.kill(os.getpid(), signal.SIGTERM)  # as SIGINT (which pytest-xdist's workers ignore)

    sampler.before_trial = interrupted_before_trial
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        worker.run()
    trials = worker.study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING], trials
    assert signal.getsignal(signal.SIGTERM) is handler  # the worker's own handler is gone


def test_an_interrupt_while_optuna_tells_the_trial_keeps_its_result(tmp_path):
    """The --devices Ctrl-C test once left a trial RUNNING: a signal that lands in Optuna's tell,
    after the objective returned, aborted the write, and Optuna's clean-up then read a state it
    never set (UnboundLocalError), which hid the interrupt from the worker. A real SIGTERM sent
    there (the storage's state write) now waits for the tell: the trial keeps its result, and the
    worker ends as interrupted."""
    worker = two_trial_worker(tmp_path)
    storage = worker.study._storage
    set_state = storage.set_trial_state_values

    def interrupted_tell(trial_id, state, values=None):
        if state == TrialState.COMPLETE:
            os.kill(os.getpid(), signal.SIGTERM)  # as SIGINT (which pytest-xdist's workers ignore)
        return set_state(trial_id, state, values)

    storage.set_trial_state_values = interrupted_tell
    with pytest.raises(KeyboardInterrupt):
        worker.run()
    trials = worker.study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE], trials
    assert trials[0].user_attrs["speedup"] > 0  # measured, told, kept


@pytest.mark.parametrize("lands_in, n_trials, states", [
    ("before its first batch", 3, [TrialState.FAIL, TrialState.WAITING]),
    ("after its last batch", 3, [TrialState.COMPLETE]),
    ("after its last batch", 1, [TrialState.COMPLETE]),
])
def test_an_interrupt_python_ignored_in_a_gc_callback_still_ends_the_worker(tmp_path, lands_in,
                                                                            n_trials, states):
    """CI once saw a SIGINT land inside SQLAlchemy's weakref callback during garbage collection:
    Python printed "Exception ignored" and the worker ran on and exited 0. A real SIGTERM raised
    inside a `__del__` (ignored there, as in that callback) now ends the worker: within a batch
    when it lands in a trial's batches (the trial failed and re-queued, as on Ctrl-C), before the
    next trial when it lands after them, and as interrupted (130 from the CLI), not as done, in
    the study's last trial."""
    from optsearch.optimize.worker import Worker, WorkerOptions

    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = write_spec(tmp_path / "t.toml",
                      TINY_SPEC.replace("n_trials = 4", f"n_trials = {n_trials}\nwarm_start = []"))
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    worker = Worker(url, "tiny", WorkerOptions(progress=False, artifact_dir=str(tmp_path / "art")))
    owner, name = {"before its first batch": (worker, "early_stop_rule"),  # asked before batch 1
                   "after its last batch": (worker.baselines, "trial_measured")}[lands_in]
    hooked = getattr(owner, name)
    ignored = []

    class SignalsWhenCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # as SIGINT (which pytest-xdist's workers ignore)
            time.sleep(0.1)  # the handler runs here and raises where Python ignores exceptions

    def interrupted_in_a_gc_callback(*args):
        if not ignored:
            hook = sys.unraisablehook
            sys.unraisablehook = lambda unraisable: ignored.append(unraisable.exc_type)
            try:
                SignalsWhenCollected()  # collected at once: __del__ runs, its exception is ignored
            finally:
                sys.unraisablehook = hook
        return hooked(*args)

    setattr(owner, name, interrupted_in_a_gc_callback)
    with pytest.raises(KeyboardInterrupt):
        worker.run()
    assert ignored == [KeyboardInterrupt]  # the interrupt was raised, and Python dropped it
    trials = worker.study.get_trials()
    assert [t.state for t in trials] == states, trials  # no further trial started
    if states[0] == TrialState.FAIL:
        assert trials[0].user_attrs.get("batches_evaluated") is None  # stopped inside the trial


SIGNALS_WHEN_COLLECTED = """
import os, signal, sys, time

class SignalsWhenCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler raises here, where Python ignores exceptions
"""


def run_interrupted_script(script: str) -> subprocess.CompletedProcess:
    """A Python process whose `SignalsWhenCollected()` gets Ctrl-C where Python ignores it."""
    return subprocess.run([sys.executable, "-c", SIGNALS_WHEN_COLLECTED + script],
                          capture_output=True, text=True, timeout=120)


def test_an_interrupt_python_ignored_prints_no_traceback():
    """CI saw Ctrl-C land in SQLAlchemy's weakref callback: the worker stopped as it should, but
    Python printed "Exception ignored in ... Traceback ... KeyboardInterrupt" above our one line.
    The interrupt is kept and raised at the next check; Python's report of it is not printed,
    while any other exception Python ignores still is."""
    result = run_interrupted_script("""
from optsearch.optimize.recovery import Interrupts

class FailsWhenCollected:
    def __del__(self):
        raise ValueError("someone else's bug")

try:
    with Interrupts() as interrupts:
        SignalsWhenCollected()
        FailsWhenCollected()
        interrupts.raise_lost()
    print("ran on")
except KeyboardInterrupt:
    print("interrupted")
""")
    assert result.stdout.strip() == "interrupted", result.stderr
    assert "KeyboardInterrupt" not in result.stderr, result.stderr
    assert "ValueError: someone else's bug" in result.stderr  # not ours: still reported


def test_a_ctrl_c_python_ignored_outside_a_trial_is_signalled_again():
    """Outside a worker's trials (loading a model, a command's own work) nothing kept a Ctrl-C
    that landed in a garbage-collector callback: Python printed its traceback and the command
    ran on. The CLI's hook signals it again: the run ends as interrupted, with no traceback."""
    result = run_interrupted_script("""
from optsearch.cli.main import resignal_lost_interrupt

sys.unraisablehook = resignal_lost_interrupt
try:
    SignalsWhenCollected()
    time.sleep(2)
    print("ran on")
except KeyboardInterrupt:
    print("interrupted")
""")
    assert result.stdout.strip() == "interrupted", result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_an_interrupt_leaves_no_heartbeat_thread_for_shutdown_to_wait_on(tmp_path):
    """A Ctrl-C while Optuna starts a trial's heartbeat thread skips its stop: the worker stops
    it, or Python's shutdown would wait for it forever."""
    from optuna.storages._heartbeat import HeartbeatThread

    from optsearch.optimize.recovery import stop_orphaned_heartbeats

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=60)
    study = optuna.create_study(storage=storage)
    heartbeat = HeartbeatThread(study.ask()._trial_id, storage)
    heartbeat.start()  # and never joined, as after the interrupt
    orphan = heartbeat._thread
    assert orphan.is_alive() and not orphan.daemon
    stop_orphaned_heartbeats()
    orphan.join(timeout=10)
    assert not orphan.is_alive()  # unstopped, it would wait 60 s and beat again, forever


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_workers_started_together_on_a_new_storage_all_join_one_study(tmp_path, backend, request):
    """Eight `run`s started at the same moment on a new database: each opens the storage (all
    create its tables at once: PostgreSQL's CREATE TABLE IF NOT EXISTS and Alembic's version row
    race) and creates-or-joins the study (a joiner may find it before its creator stored the
    spec). All join one study, its warm start enqueued once (5 of 6 failed before on PostgreSQL)."""
    import threading

    from optsearch.optimize.create import create_study
    from optsearch.optimize.warm_start import warm_start_params

    url = request.getfixturevalue("pg_url") if backend == "postgresql" \
        else f"sqlite:///{tmp_path / 'new.db'}"
    spec = load_spec(write_spec(tmp_path / "tiny.toml", TINY_SPEC))
    start, errors = threading.Barrier(8), []

    def join() -> None:
        start.wait()
        try:
            create_study(spec, open_storage(url, heartbeat_interval=None), load_if_exists=True)
        except Exception as error:  # noqa: BLE001 - the test counts every kind
            errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=join) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    [summary] = optuna.get_all_study_summaries(url)
    study = optuna.load_study(study_name=summary.study_name, storage=url)
    assert studies.SPEC_ATTR in study.user_attrs
    assert len(study.trials) == len(warm_start_params(spec, open_storage(url)))


def test_a_study_being_created_is_waited_for_and_a_foreign_one_refused_at_once(tmp_path):
    """A joiner that finds the study before its creator stored the spec waits for the spec (it
    used to say "not made by optsearch", exit 2, for 2 of 8 `run`s started together); a study
    Optuna made for something else (it has trials, no spec) is refused without waiting."""
    import threading

    from optsearch.errors import UsageError
    from optsearch.optimize.create import CREATING_GRACE_S, create_study
    from optsearch.optimize.objectives import directions

    spec = load_spec(write_spec(tmp_path / "tiny.toml", TINY_SPEC))
    url = f"sqlite:///{tmp_path / 'joined.db'}"
    creating = optuna.create_study(study_name="tiny", storage=url, directions=directions(spec))
    stored = create_study(spec, open_storage(url), name="model").user_attrs[studies.SPEC_ATTR]
    later = threading.Timer(1.0, lambda: creating.set_user_attr(studies.SPEC_ATTR, stored))
    later.start()
    started = time.monotonic()
    joined = create_study(spec, open_storage(url), load_if_exists=True)
    assert 0.9 < time.monotonic() - started < 5 and joined.user_attrs[studies.SPEC_ATTR] == stored
    foreign = optuna.create_study(study_name="foreign", storage=url)
    foreign.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    started = time.monotonic()
    with pytest.raises(UsageError, match="was not made by optsearch"):
        create_study(spec, open_storage(url), name="foreign", load_if_exists=True)
    assert time.monotonic() - started < CREATING_GRACE_S / 2  # refused without the wait
