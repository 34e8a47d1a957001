"""`optsearch storage-proxy` and grpc:// storages: the same behaviour as a direct URL (create,
workers, show, export, dashboard, heartbeat re-queueing), the password on the proxy's side only."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
from optuna.trial import TrialState

from optsearch.errors import StorageError
from optsearch.measure.evaluate import evaluator_from_spec
from optsearch.optimize.create import create_study
from optsearch.optimize.worker import Worker, WorkerOptions
from optsearch.storage.proxy import BEAT_ATTR
from optsearch.storage.rdb import open_storage
from optsearch.study_spec import load_spec
from tests.conftest import TINY_SPEC, free_port, optsearch_cmd, write_spec


def start_proxy(database_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "optsearch.cli", "storage-proxy", "--storage",
                              database_url, "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proxy.stdout.readline()
    assert "listening on grpc://127.0.0.1" in line, line
    return proxy, f"grpc://127.0.0.1:{port}"


@pytest.fixture
def proxied(tmp_path):
    """A proxy in front of a SQLite file: (proxy URL, database URL, the proxy's first line)."""
    database = f"sqlite:///{tmp_path / 'behind.db'}"
    open_storage(database, heartbeat_interval=None)  # the tables
    proxy, url = start_proxy(database)
    yield url, database
    proxy.terminate()
    proxy.wait(timeout=10)


def test_commands_work_through_the_proxy_and_the_password_stays_behind_it(tmp_path, pg_url):
    proxy, url = start_proxy(pg_url)
    try:
        spec = write_spec(tmp_path / "tiny.toml", TINY_SPEC)
        created = optsearch_cmd("study", "create", str(spec), "--storage", url)
        assert created.returncode == 0, created.stderr
        assert f"ready in {url}" in created.stdout
        listing = optsearch_cmd("study", "list", "--storage", url)
        assert "tiny" in listing.stdout and "builtin:tiny" in listing.stdout
        # the study is in the database behind the proxy
        behind = open_storage(pg_url, heartbeat_interval=None)
        assert [s.study_name for s in behind.get_all_studies()] == ["tiny"]
        again = optsearch_cmd("study", "create", str(spec), "--storage", url)
        assert again.returncode == 2 and "already exists" in again.stderr
        with_password = optsearch_cmd("study", "list", "--storage", url.replace("//", "//u:secret@"))
        assert with_password.returncode == 2 and "secret" not in with_password.stderr
        assert "names only the proxy" in with_password.stderr
    finally:
        proxy.terminate()
        proxy.wait(timeout=10)
    gone = optsearch_cmd("study", "list", "--storage", url)  # down: may work later (exit 75)
    assert gone.returncode == 75 and gone.stderr.count("\n") == 1
    assert "cannot reach the storage proxy" in gone.stderr


def test_a_proxy_refuses_another_proxy_and_a_taken_port(proxied):
    url, database = proxied
    chained = optsearch_cmd("storage-proxy", "--storage", url)
    assert chained.returncode == 2 and "not another proxy" in chained.stderr
    taken = optsearch_cmd("storage-proxy", "--storage", database, "--port", url.rsplit(":", 1)[1])
    assert taken.returncode != 0 and taken.stderr.count("\n") == 1 and "cannot listen" in taken.stderr


def test_a_stale_trial_is_failed_and_requeued_through_the_proxy(proxied):
    """A worker's beat is a trial attribute; a trial whose beat is older than the grace period is
    failed and its parameters queued again by Optuna's own fail_stale_trials, as on a direct URL.
    A trial that beats is left alone."""
    url, _ = proxied
    storage = open_storage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="beats", storage=storage)
    dead, alive = study.ask(), study.ask()
    dead.suggest_int("x", 0, 10)
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)
    storage.record_heartbeat(alive._trial_id)
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials[:2]] == [TrialState.FAIL, TrialState.RUNNING]
    [requeued] = trials[2:]
    assert requeued.state == TrialState.WAITING and requeued.params == trials[0].params
    assert requeued.system_attrs["failed_trial"] == dead.number
    assert BEAT_ATTR in trials[1].system_attrs
    assert BEAT_ATTR not in requeued.system_attrs  # else stale at once, once popped
    popped = study.ask()  # the retry, RUNNING again: it never beat
    assert popped.number == requeued.number
    assert storage.running_with_heartbeat(study._study_id) == {alive._trial_id}


def test_a_worker_runs_a_study_through_the_proxy_and_the_dashboard_reads_it(proxied, tmp_path, tiny_pipe):
    url, database = proxied
    spec_path = write_spec(tmp_path / "tiny.toml", TINY_SPEC.replace("n_trials = 4", "n_trials = 2"))
    spec = load_spec(spec_path)
    create_study(spec, open_storage(url, heartbeat_interval=None))
    evaluator = evaluator_from_spec(spec, pipe=tiny_pipe)
    worker = Worker(url, "tiny", WorkerOptions(progress=False, artifact_dir=str(tmp_path / "art"),
                                               heartbeat_interval=1, grace_period=5), evaluator=evaluator)
    assert worker.run() == 2
    direct = open_storage(database, heartbeat_interval=None)
    trials = direct.get_all_trials(direct.get_study_id_from_name("tiny"))
    assert [t.state.is_finished() for t in trials] == [True, True]
    assert all(BEAT_ATTR in t.system_attrs for t in trials if "reused_from" not in t.user_attrs)
    shown = optsearch_cmd("study", "show", "tiny", "--json", "--storage", url)
    assert json.loads(shown.stdout)["finished"] == 2
    exported = optsearch_cmd("study", "export", "tiny", "-o", str(tmp_path / "p.json"), "--storage", url)
    assert exported.returncode in (0, 3), exported.stderr  # 3: no trial met the limit
    port = free_port()
    dashboard = subprocess.Popen([sys.executable, "-m", "optsearch.cli", "dashboard", "--storage", url,
                                  "--port", str(port), "--artifact-dir", str(tmp_path / "art")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(60):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as response:
                    studies = json.load(response)["study_summaries"]
                break
            except OSError:
                time.sleep(0.5)
        assert [s["study_name"] for s in studies] == ["tiny"]
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=10)


def test_a_malformed_grpc_url_is_one_line():
    with pytest.raises(StorageError, match="expected grpc://host:port"):
        open_storage("grpc://127.0.0.1:notaport")
