"""Faults with real processes and real storages: dropped connections, out of memory, a shared
SQLite file, pipelines that cannot load."""

from __future__ import annotations

import json
import platform
import subprocess
import threading
import time
import urllib.request

import optuna
import psycopg
import pytest
import sqlalchemy
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState

from optsearch.measure.evaluate import evaluator_from_spec
from optsearch.optimize import study as studies
from optsearch.optimize.worker import Worker, WorkerOptions
from optsearch.storage.notes import read_note
from optsearch.study_spec import load_spec
from tests.conftest import (
    OPTSEARCH,
    PG_ADMIN_URL,
    SLOW_SPEC,
    TINY_SPEC,
    free_port,
    optsearch_cmd,
    optsearch_process,
    storage_snapshot,
    write_spec,
)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def start_worker(url, *extra, env=None, study="tiny"):
    """A worker process beside the test; `env`: faults to inject (read as it runs)."""
    return optsearch_process("worker", "--study", study, "--storage", url, "--quiet",
                             "--heartbeat-interval", "1", "--grace-period", "4", *extra,
                             runtime_env=env)


def create(spec_text, tmp_path, url, name="tiny.toml"):
    spec = write_spec(tmp_path / name, spec_text)
    result = optsearch_cmd("study", "create", str(spec), "--storage", url)
    assert result.returncode == 0, result.stderr
    return optuna.load_study(study_name="tiny", storage=url)


def test_worker_survives_dropped_database_connections(tmp_path, pg_url):
    create(SLOW_SPEC.replace("n_trials = 4", "n_trials = 5"), tmp_path, pg_url)
    observer = optuna.storages.RDBStorage(pg_url, engine_kwargs={
        "pool_pre_ping": True, "connect_args": {"application_name": "optsearch-test-observer"}})
    study = optuna.load_study(study_name="tiny", storage=observer)
    database = pg_url.rsplit("/", 1)[1]
    worker = start_worker(pg_url, "--artifact-dir", str(tmp_path / "artifacts"))
    terminated, burst_end = 0, None
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as admin:
        deadline = time.monotonic() + 300
        while worker.poll() is None and time.monotonic() < deadline:
            if burst_end is None and len(study.get_trials(deepcopy=False, states=FINISHED)) >= 1:
                burst_end = time.monotonic() + 5
                deadline = burst_end + 25  # then the database holds: a worker must end, not hang
            if burst_end is not None:
                rows = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid() "
                    "AND application_name <> 'optsearch-test-observer'",
                    (database,)).fetchall()
                terminated += len(rows)
            # A 5 s burst drops connections while they are in use, then one drop a second for 25 s.
            time.sleep(0.02 if burst_end and time.monotonic() < burst_end else 1.0)
    _, err = worker.communicate(timeout=300)
    assert terminated >= 3, "the test never dropped the worker's connections"
    assert worker.returncode == 0, err
    assert "database error" in err or "heartbeat of trial" in err  # it noticed and went on
    assert "already set" not in err  # a retry's constraints are its own (test_requeue.py)
    trials = study.get_trials()
    assert len(studies.measured_trials(study)) == 5  # a repeat's free copy is no trial of n_trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]


# the statements that store a measured trial: its figures, and its image grid's artifact record
RECORD_WRITES = {"figures": ("trial_user_attributes", "speedup"),
                 "grid": ("trial_system_attributes", "trial-0000_")}


@pytest.mark.parametrize("write", sorted(RECORD_WRITES))
def test_a_connection_dropped_while_a_trial_is_told_keeps_its_measurement(tmp_path, pg_url, tiny_pipe,
                                                                          write):
    """The server drops the worker's connection in the middle of storing a measured trial's
    figures or its image grid (the moment a failed trial costs most: its whole measurement). The
    write is made again on a fresh connection; the trial completes once, not failed and measured
    again, and the dashboard shows one grid."""
    create(TINY_SPEC.replace("n_trials = 4", "n_trials = 1\nwarm_start = []"), tmp_path, pg_url)
    spec = load_spec(tmp_path / "tiny.toml")
    worker = Worker(pg_url, "tiny", WorkerOptions(progress=False, n_trials=1),
                    evaluator=evaluator_from_spec(spec, pipe=tiny_pipe))
    table, marker = RECORD_WRITES[write]
    dropped = []

    def drop_at_the_write(connection, cursor, statement, parameters, context, executemany):
        if not dropped and table in statement and marker in str(parameters):
            backend = connection.connection.dbapi_connection.info.backend_pid
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
            dropped.append(statement)

    sqlalchemy.event.listen(worker.storage.engine, "before_cursor_execute", drop_at_the_write)
    assert worker.run() == 1
    assert dropped, f"the test never dropped the connection at the {write}"
    [trial] = optuna.load_study(study_name="tiny", storage=pg_url).get_trials()
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["speedup"] > 0
    assert trial.system_attrs["constraints:quality"] == trial.user_attrs["constraints"]["quality"]
    grids = [meta.filename for meta in get_all_artifact_meta(trial, storage=worker.storage)]
    assert len(grids) == 1 and grids[0].startswith("trial-0000_"), grids


@pytest.mark.parametrize("kind", ["cuda", "memory"])
def test_out_of_memory_fails_the_trial_and_the_worker_goes_on(tmp_path, kind):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = create(TINY_SPEC.replace("n_trials = 4", "n_trials = 3"), tmp_path, url)
    fault = "1" if kind == "cuda" else "1:memory"  # the first trial's second batch
    worker = start_worker(url, env={"OPTSEARCH_FAULT_OOM": fault})
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].number == 0
    reason = failed[0].user_attrs["fail_reason"]
    assert "out of memory at batch size 2 with deepcache" in reason  # names the setting that hit it
    # the worker's line for it names the setting once, then why it failed
    line = next(line for line in out.splitlines() if ": trial 0 " in line)
    assert line.count("deepcache(") == 1 and ": fail (out of memory at batch size 2: " in line
    assert len(studies.measured_trials(study)) == 3


def test_a_fault_no_check_foresaw_stops_the_worker_and_the_failed_trial_says_why(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = create(TINY_SPEC, tmp_path, url)
    worker = start_worker(url, env={"OPTSEARCH_FAULT_ERROR": "1"})  # the first trial's second batch
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 1, err
    assert "Traceback" not in err and "injected fault at timed batch 1" in err
    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    assert failed.number == 0 and failed.user_attrs["fail_reason"].startswith(
        "RuntimeError: injected fault at timed batch 1 (OPTSEARCH_FAULT_ERROR) with deepcache(")
    assert read_note(study, failed._trial_id) == f"## Trial 0: failed\n\n{failed.user_attrs['fail_reason']}\n"
    shown = optsearch_cmd("study", "show", "tiny", "--storage", url)
    assert shown.returncode == 0, shown.stderr
    assert "  trial 0 failed: RuntimeError: injected fault at timed batch 1" in shown.stdout
    counts = next(line for line in shown.stdout.splitlines() if line.startswith("trials: "))
    assert counts.startswith("trials: failed 1, queued ") and "waiting" not in counts  # as study list
    as_json = json.loads(optsearch_cmd("study", "show", "tiny", "--storage", url, "--json").stdout)
    assert [f["trial"] for f in as_json["failed"]] == [0]
    (listed,) = json.loads(optsearch_cmd("study", "list", "--storage", url, "--json").stdout)
    assert listed["failed"] == 1 and listed["measured"] == 0
    refused = optsearch_cmd("study", "export", "tiny", "--storage", url, "-o", str(tmp_path / "sp.json"))
    assert refused.returncode == 3 and refused.stderr.strip() == (  # not "relax quality.limit"
        "optsearch: error: study 'tiny' has no measured trial yet (1 failed: `study show` says why)")


def test_a_command_out_of_memory_says_which_setting_to_change_exit_2(tmp_path):
    """`evaluate` (as `study confirm` and a notebook's search) measures at the spec's batch size:
    out of memory there is one line naming prompts.batch_size, exit 2, not a fault of ours (1)."""
    spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC)
    process = optsearch_process("evaluate", str(spec), "--set", "deepcache.cache_interval=3", "-q",
                                runtime_env={"OPTSEARCH_FAULT_OOM_BASELINE": "1"})
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    assert err.strip().splitlines()[-1] == (
        "optsearch: error: out of memory (injected out-of-memory in the baseline "
        "(OPTSEARCH_FAULT_OOM_BASELINE)): the spec's prompts.batch_size does not fit this device; "
        "lower it")
    assert "Traceback" not in err


def test_an_out_of_memory_says_what_the_allocator_tried_and_had_not_its_advice():
    """CUDA's out-of-memory message runs on for 400 characters (the allocator's settings, the
    documentation's address): a trial's reason, `study show` and the error line keep its first
    three sentences."""
    import torch

    from optsearch.errors import exit_code_for, problem_lines
    from optsearch.optimize.recovery import out_of_memory_reason

    cuda = torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.19 GiB "
        "of which 7.06 MiB is free. Process 12345 has 79.17 GiB memory in use. Of the allocated "
        "memory 78.50 GiB is allocated by PyTorch, and 130.30 MiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See "
        "documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html)")
    told = ("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of "
            "79.19 GiB of which 7.06 MiB is free.")
    assert out_of_memory_reason(4, {"fbcache": {"threshold": 0.1}}, cuda) == \
        f"out of memory at batch size 4 with fbcache(threshold=0.100): {told}"
    assert problem_lines(cuda) == [f"out of memory ({told}): the spec's prompts.batch_size does not "
                                   "fit this device; lower it"] and exit_code_for(cuda) == 2
    assert problem_lines(MemoryError()) == ["out of memory (MemoryError): the spec's "
                                            "prompts.batch_size does not fit this device; lower it"]


def test_check_says_a_batch_that_does_not_fit_and_the_fix(tmp_path):
    spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC)
    process = optsearch_process("check", str(spec), runtime_env={"OPTSEARCH_FAULT_OOM_BASELINE": "1"})
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2, err
    assert "baseline batch: injected out-of-memory in the baseline (OPTSEARCH_FAULT_OOM_BASELINE) " \
        "(prompts.batch_size=2: lower it, or run workers with --halve-batch-on-oom)" in err, err


def test_only_a_failure_records_a_reason():
    """A trial stopped early (TrialPruned, raised through the same block) is not a failure."""
    from optsearch.optimize.recovery import failure_recorded

    study = optuna.create_study()
    for raised in (optuna.TrialPruned("stopped early"), ValueError("broken\nsecond line")):
        trial = study.ask()
        trial.set_user_attr("setting", {"deepcache": {"cache_interval": 3}})
        with pytest.raises(type(raised)), failure_recorded(trial):
            raise raised
    pruned, failed = study.trials
    assert "fail_reason" not in pruned.user_attrs
    assert failed.user_attrs["fail_reason"] == "ValueError: broken with deepcache(cache_interval=3)"


def test_a_worker_whose_every_trial_runs_out_of_memory_stops_after_five(tmp_path):
    """Failed trials do not count toward n_trials: a worker whose every setting runs out of memory
    would fail trial after trial for good. After five in a row it stops, one line, exit 2."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = create(TINY_SPEC.replace("n_trials = 4", "n_trials = 20"), tmp_path, url)
    worker = start_worker(url, env={"OPTSEARCH_FAULT_OOM": "0:every"})
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 2, err
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 5 and not study.get_trials(states=FINISHED)
    assert all("out of memory at batch size 2 with " in t.user_attrs["fail_reason"] for t in failed)
    assert all(t.user_attrs["fail_reason"] in read_note(study, t._trial_id) for t in failed)
    assert sum(": fail (out of memory at batch size 2" in line for line in out.splitlines()) == 5
    (line,) = [line for line in err.splitlines() if line.startswith("optsearch: error:")]
    assert line.startswith(f"optsearch: error: the last 5 trials of this worker failed (the last, trial "
                           f"{failed[-1].number}: out of memory at batch size 2 with ")
    assert line.endswith("it stops, as failed trials do not count toward search.n_trials: lower "
                         "prompts.batch_size, or start workers with --halve-batch-on-oom")


def test_halving_the_batch_keeps_results(tmp_path):
    setting = {"deepcache.cache_interval": 3, "deepcache.cache_branch_id": 0, "tome.ratio": 0.5,
               "tome.max_downsample": 1}
    spec = TINY_SPEC.replace("n_trials = 4", "n_trials = 1\nwarm_start = []") \
        .replace("limit = 30.0", "limit = 5.0")
    reference_url = f"sqlite:///{tmp_path / 'reference.db'}"
    faulty_url = f"sqlite:///{tmp_path / 'faulty.db'}"
    runs = {}
    for url, env, extra, text in (
        (reference_url, {}, [], spec.replace("batch_size = 2", "batch_size = 1")),
        (faulty_url, {"OPTSEARCH_FAULT_OOM": "0"}, ["--halve-batch-on-oom"], spec),
    ):
        folder = tmp_path / ("ref" if url == reference_url else "faulty")
        folder.mkdir()
        study = create(text, folder, url)
        study.enqueue_trial(setting)
        worker = start_worker(url, "--artifact-dir", str(folder / "artifacts"), *extra, env=env)
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
        runs[url] = study.get_trials()
    halved = runs[faulty_url]
    assert [t.state for t in halved] == [TrialState.COMPLETE]
    assert halved[0].user_attrs["oom_halvings"] == 1 and halved[0].user_attrs["batch_size"] == 1
    assert halved[0].user_attrs["image_digests"] == runs[reference_url][0].user_attrs["image_digests"]
    faulty = optuna.load_study(study_name="tiny", storage=faulty_url)
    assert sorted(b["batch_size"] for b in studies.baselines(faulty).values()) == [1, 2]


def test_a_baseline_too_large_for_the_device_says_so_or_halves(tmp_path):
    """The plain pipeline out of memory at the spec's batch size: one line naming the size and
    the fix (exit 2, no traceback, nothing of the study written but its creation); with
    --halve-batch-on-oom the worker times its baseline at half the size and runs its trials."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = create(TINY_SPEC.replace("n_trials = 4", "n_trials = 1"), tmp_path, url)
    out_of_memory = {"OPTSEARCH_FAULT_OOM_BASELINE": "1"}
    worker = start_worker(url, env=out_of_memory)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 2, err
    assert err.strip().splitlines() == [
        "optsearch: error: the plain pipeline ran out of memory at batch size 2 on "
        f"cpu:{platform.machine()}: lower prompts.batch_size (or start workers with "
        "--halve-batch-on-oom) (injected out-of-memory in the baseline (OPTSEARCH_FAULT_OOM_BASELINE))"]
    assert studies.baselines(study) == {} and not study.get_trials(states=FINISHED)
    worker = start_worker(url, "--halve-batch-on-oom", env={"OPTSEARCH_FAULT_OOM_BASELINE": "2"})
    _, err = worker.communicate(timeout=300)  # not even one image fits
    assert worker.returncode == 2, err
    assert "ran out of memory at batch size 1 on cpu" in err and ": it does not fit this device: " \
        "offload it (a factory, as studies/offload_pipes.py) or take a smaller model.dtype" in err
    worker = start_worker(url, "--halve-batch-on-oom", env=out_of_memory)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err
    assert "ran out of memory at batch size 2: going on at 1" in err
    assert [b["batch_size"] for b in studies.baselines(study).values()] == [1]
    (trial,) = study.get_trials(states=FINISHED)
    assert trial.user_attrs["batch_size"] == 1


def test_a_re_timing_out_of_memory_halves_with_the_option_and_else_ends_in_one_line(tmp_path):
    """The baseline re-timed between trials (search.retime_baseline_every) runs out of memory
    (what the trials left behind): --halve-batch-on-oom goes on at half the size, as for the first
    baseline; without it the worker ends with the one out-of-memory line, exit 2."""
    spec = TINY_SPEC.replace("n_trials = 4", "n_trials = 2\nretime_baseline_every = 1\nwarm_start = []")
    after_first_timing = {"OPTSEARCH_FAULT_OOM_BASELINE": "1@2"}  # its two batches pass
    for folder, extra, code in (("plain", [], 2), ("halving", ["--halve-batch-on-oom"], 0)):
        (tmp_path / folder).mkdir()
        url = f"sqlite:///{tmp_path / folder / 'study.db'}"
        study = create(spec, tmp_path / folder, url)
        worker = start_worker(url, *extra, env=after_first_timing)
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == code, err
        finished = study.get_trials(states=FINISHED)
        if code == 2:
            assert err.strip().splitlines()[-1] == (
                "optsearch: error: out of memory (injected out-of-memory in the baseline "
                "(OPTSEARCH_FAULT_OOM_BASELINE)): the spec's prompts.batch_size does not fit this "
                "device; lower it")
            assert [t.user_attrs["batch_size"] for t in finished] == [2]  # the first trial's kept
        else:
            assert "the baseline ran out of memory between trials at batch size 2: going on at 1" in err
            assert [t.user_attrs["batch_size"] for t in finished] == [2, 1]
            assert sorted(b["batch_size"] for b in studies.baselines(study).values()) == [1, 2]


def test_two_workers_and_the_dashboard_share_one_sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    spec = TINY_SPEC.replace("n_trials = 4", "n_trials = 20").replace("steps = 8", "steps = 3") \
        .replace("num_samples = 4", "num_samples = 2")
    study = create(spec + "[artifacts]\ngrid_prompts = 1\n", tmp_path, url)
    port = free_port()
    dashboard = subprocess.Popen([OPTSEARCH, "dashboard", "--storage", url, "--port", str(port)],
                                 cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
    workers = [start_worker(url, "--artifact-dir", str(tmp_path / "artifacts")) for _ in range(2)]
    reads, stop = [], threading.Event()

    def poll_dashboard():
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/1", timeout=5) as r:
                    reads.append(len(json.load(r)["trials"]))
            except OSError:
                pass
            time.sleep(0.2)

    poller = threading.Thread(target=poll_dashboard)
    poller.start()
    try:
        outputs = [w.communicate(timeout=600) for w in workers]
    finally:
        stop.set()
        poller.join()
        dashboard.terminate()
        _, dashboard_err = dashboard.communicate(timeout=30)
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
        assert "locked" not in err
    assert "database is locked" not in dashboard_err
    assert len(reads) > 5 and max(reads) >= 10, "the dashboard did not read while workers wrote"
    assert len(studies.measured_trials(study)) == 20  # copies of a repeated setting are free


@pytest.mark.parametrize("model, device, message", [
    ("./no-such-model-folder", "cpu", "no-such-model-folder' does not exist"),
    ("builtin:tiny", "cuda:7", "CUDA is not available" if not __import__("torch").cuda.is_available()
     else "does not exist"),
])
def test_worker_that_cannot_load_fails_fast_without_touching_the_study(tmp_path, model, device,
                                                                        message):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    text = TINY_SPEC.replace('id = "builtin:tiny"', f'id = "{model}"').replace(
        'device = "cpu"', f'device = "{device}"')
    create(text, tmp_path, url)
    before = storage_snapshot(url)
    result = optsearch_cmd("worker", "--study", "tiny", "--storage", url, "--quiet")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert storage_snapshot(url) == before


def test_a_database_down_for_good_ends_the_worker_with_one_line_and_exit_75(tmp_path, pg_url):
    """The outage path, on a real PostgreSQL that stops taking connections: each failure waits
    and reconnects; past the limit the worker stops with one line that says to start it again
    (exit 75, which an orchestrator retries), not with the driver's exception (exit 1)."""
    from optsearch.errors import StorageUnreachable, exit_code_for
    from optsearch.optimize.recovery import DatabaseOutages
    from optsearch.storage.rdb import open_storage

    study = create(TINY_SPEC, tmp_path, pg_url)
    storage = open_storage(pg_url, heartbeat_interval=None)
    name = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                      (name,))
    try:
        outages = DatabaseOutages(storage, limit=2)
        errors = []
        for _ in range(2):
            try:
                storage.get_all_studies()
            except Exception as error:  # noqa: BLE001 - the driver's own, as a worker meets it
                errors.append(error)
                try:
                    outages.recover(error, study, None)
                except StorageUnreachable as stopped:
                    errors.append(stopped)
        assert len(errors) == 3 and isinstance(errors[-1], StorageUnreachable)
        assert exit_code_for(errors[-1]) == 75 and "\n" not in str(errors[-1])
        assert "stopped answering (OperationalError" in str(errors[-1])
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        storage.engine.dispose()
