"""Shared fixtures: real tiny pipelines (built once per session) and a tiny CLIP model."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from optsearch.measure.models import load_pipeline
from optsearch.measure.quality import ClipScorer

ROOT = Path(__file__).resolve().parents[1]
OPTSEARCH = str(Path(sys.executable).with_name("optsearch"))
# `make test` runs two tests at a time (pytest-xdist, one per core): each test, and every worker
# process it starts (they inherit the environment), computes on one thread, so the two do not
# time each other's load.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_pipe():
    return load_pipeline("builtin:tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_xl_pipe():
    return load_pipeline("builtin:tiny-xl", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_clip():
    return ClipScorer("builtin:tiny", "none")


def generate_images(call, prompts, steps=10, seed=0, reseed=None) -> np.ndarray:
    """Images of one call with one seeded generator per prompt (float, 0..1)."""
    if reseed is not None:
        reseed(seed)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return call(prompts, num_inference_steps=steps, output_type="np", generator=generators).images


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_SPEC = """
name = "tiny"
[model]
id = "builtin:tiny"
device = "cpu"
dtype = "float32"
steps = 8
[prompts]
source = "builtin"
num_samples = 4
batch_size = 2
[quality]
clip_model = "builtin:tiny"
clip_pretrained = "none"
metric = "psnr"
limit = 30.0
[search]
accelerators = ["deepcache", "tome"]
n_trials = 4
"""


# One image per batch and more steps: trials last a few seconds, long enough to interrupt; no
# warm start, so the trials a test counts are the ones it sees sampled.
SLOW_SPEC = TINY_SPEC.replace("batch_size = 2", "batch_size = 1").replace("steps = 8", "steps = 16") \
    .replace("n_trials = 4", "n_trials = 4\nwarm_start = []")

PG_ADMIN_URL = os.environ.get("OPTSEARCH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_admin():
    import psycopg

    return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test, dropped afterwards.

    Locally the test is skipped when PostgreSQL is unreachable; under CI=true it fails instead.
    """
    import uuid

    try:
        admin = _pg_admin()
    except Exception as error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is unreachable under CI=true: {error}")
        pytest.skip(f"PostgreSQL unreachable: {error}")
    name = f"optsearch_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres:pw-not-checked@127.0.0.1:5432/{name}"
    finally:
        with _pg_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sigint_default() -> None:
    """`preexec_fn` for workers a test will Ctrl-C: a shell starts background jobs (`make test &`)
    with SIGINT ignored, children inherit that, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def optsearch_cmd(*args: str, cwd=None, timeout: float = 600, env=None):
    """Run the optsearch console script as a user would: in a process of its own, forked from
    one that imported its libraries already (tests/forked_cli.py) where the test gives no
    environment of its own; else a new interpreter."""
    if env is None and _FORKED_CLI.available():
        return _FORKED_CLI.run([OPTSEARCH, *args], cwd=cwd, timeout=timeout)
    return subprocess.run([OPTSEARCH, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def optsearch_process(*args: str, cwd=None, runtime_env: dict | None = None,
                      new_session: bool = False):
    """Start the optsearch console script beside the test, as `subprocess.Popen(...,
    stdout=PIPE, stderr=PIPE, text=True)` would (for a worker the test signals, or several at
    once): forked as `optsearch_cmd`'s commands are, else a new interpreter. `runtime_env`: the
    variables added to the test's environment, read by the command as it runs (a fault to
    inject), not at import. Its output is read once it ended (`communicate`), not line by line."""
    env = {**os.environ, **(runtime_env or {})}
    if _FORKED_CLI.available():
        return _FORKED_CLI.start([OPTSEARCH, *args], cwd=cwd, env=env, new_session=new_session)
    return subprocess.Popen([OPTSEARCH, *args], cwd=cwd, env=env, start_new_session=new_session,
                            preexec_fn=sigint_default, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


class ForkedProcess:
    """A command forked by tests/forked_cli.py, running beside the test: what the tests use of
    `subprocess.Popen` (pid, returncode, poll, wait, communicate, send_signal, terminate, kill).
    Its keeper writes the exit status to a file once it ended."""

    def __init__(self, args: list[str], pid: int, folder):
        self.args, self.pid, self.returncode = args, pid, None
        self.folder = folder  # a TemporaryDirectory: stdout, stderr, status
        self.paths = {name: Path(folder.name, name) for name in ("stdout", "stderr", "status")}

    def poll(self) -> int | None:
        if self.returncode is None and self.paths["status"].exists():
            import json

            status = json.loads(self.paths["status"].read_text())["status"]
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.paths["stdout"].read_text(), self.paths["stderr"].read_text()

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # ended since: as Popen, nothing to signal
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _ForkedCli:
    """This test process's client of tests/forked_cli.py, started at its first command."""

    def __init__(self):
        import threading

        self.server: subprocess.Popen | None = None
        self.lock = threading.Lock()  # one command at a time; another thread's: a new interpreter

    def available(self) -> bool:
        """Whether a command can go through the server now (a failed start falls back to new
        interpreters for the rest of the session)."""
        if os.environ.get("OPTSEARCH_TEST_NO_FORK") or self.lock.locked():
            return False
        if self.server is None:
            import atexit

            self.server = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "forked_cli.py"), OPTSEARCH],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            atexit.register(self.close)
        return self.server.poll() is None

    def close(self) -> None:
        """End the server (EOF on its stdin) with this test process."""
        self.server.stdin.close()
        self.server.wait(timeout=60)
        self.server.stdout.close()

    def run(self, argv: list[str], cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
        """`subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout)`."""
        import json
        import tempfile

        with self.lock, tempfile.TemporaryDirectory() as folder:
            pid = self._fork(argv, cwd, dict(os.environ), folder)
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            ended = self._line(timeout)
            if ended is None:  # as subprocess.run: the child killed, then TimeoutExpired
                os.kill(pid, signal.SIGKILL)
            status = json.loads(ended or self._line())["status"]
            if ended is None:
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status),
                                               out.read_text(), err.read_text())

    def start(self, argv: list[str], cwd, env: dict, new_session: bool) -> ForkedProcess:
        """A command forked to run beside the test (the server answers once it runs)."""
        import tempfile

        folder = tempfile.TemporaryDirectory()
        with self.lock:
            pid = self._fork(argv, cwd, env, folder.name, new_session=new_session,
                             status=str(Path(folder.name, "status")))
        return ForkedProcess(argv, pid, folder)

    def _fork(self, argv: list[str], cwd, env: dict, folder: str, **extra) -> int:
        """Ask the server to fork `argv`, its stdout and stderr to files in `folder` (`extra`:
        the rest of the request); the child's pid. The caller holds the lock."""
        import json

        outputs = {name: Path(folder, name) for name in ("stdout", "stderr")}
        for path in outputs.values():
            path.touch()
        self.server.stdin.write(json.dumps({
            "argv": argv, "cwd": str(cwd or os.getcwd()), "env": env,
            **{name: str(path) for name, path in outputs.items()}, **extra}) + "\n")
        self.server.stdin.flush()
        return json.loads(self._line())["pid"]

    def _line(self, timeout: float | None = None) -> str | None:
        """The server's next answer line, read from its pipe byte by byte (a buffered reader
        would hide a line from select); None if none came within `timeout` seconds."""
        import select
        import time

        fd, line = self.server.stdout.fileno(), b""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not line.endswith(b"\n"):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            byte = os.read(fd, 1)
            if not byte:
                raise RuntimeError("tests/forked_cli.py ended (see its stderr above)")
            line += byte
        return line.decode()


_FORKED_CLI = _ForkedCli()


def study_after_one_trial(spec: Path, name: str, params: dict, family: str):
    """A study of `spec` whose first trial, `params` (enqueued), one worker ran: (the study, its
    storage URL, the worker command, the key of the calibration it stored for `family`)."""
    import optuna

    url = f"sqlite:///{spec.parent}/{spec.stem}.db"
    assert optsearch_cmd("study", "create", str(spec), "--storage", url).returncode == 0
    study = optuna.load_study(study_name=name, storage=url)
    study.enqueue_trial(params)
    worker = ("worker", "--study", name, "--storage", url, "--quiet")
    assert optsearch_cmd(*worker, "--n-trials", "1").returncode == 0
    [key] = [k for k in study.user_attrs
             if k.startswith("optsearch:calibration:") and k.endswith(f":{family}")]
    return study, url, worker, key


def one_trial_of_each(tmp_path: Path, spec, pipe, combos: tuple[str, ...]) -> list:
    """A study of `spec` whose trials are one of each combo (enqueued, the rest sampled, "auto"
    ranges calibrated first), run by a worker in this process on `pipe`: its trials, each
    asserted complete and computing part of the work."""
    import optuna

    from optsearch.measure.evaluate import evaluator_from_spec
    from optsearch.optimize.create import create_study
    from optsearch.optimize.worker import Worker, WorkerOptions
    from optsearch.storage.rdb import open_storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = create_study(spec, open_storage(url, heartbeat_interval=None))
    for combo in combos:
        study.enqueue_trial({"combo": combo})
    Worker(url, spec.name, WorkerOptions(progress=False, artifact_dir=str(tmp_path / "art")),
           evaluator=evaluator_from_spec(spec, pipe=pipe)).run()
    trials = optuna.load_study(study_name=spec.name, storage=url).trials
    assert sorted(t.user_attrs["combo"] for t in trials) == sorted(combos)
    for trial in trials:
        assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
        assert 0.0 < trial.user_attrs["compute_fraction"] < 1.0, trial.user_attrs["setting"]
    return trials


def storage_snapshot(url: str) -> dict:
    """Everything a study storage holds that a failed command must not change."""
    import optuna

    snapshot = {}
    storage = optuna.storages.RDBStorage(url)
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = [(t.number, t.state.name, t.params, t.user_attrs, t.system_attrs, t.values)
                  for t in study.get_trials(deepcopy=False)]
        system_attrs = storage.get_study_system_attrs(study._study_id)
        snapshot[summary.study_name] = (study.user_attrs, system_attrs, trials)
    storage.engine.dispose()
    return snapshot


def free_port() -> int:
    """A TCP port nobody listens on now (for servers a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def dashboard(url: str, folder: Path):
    """`optsearch dashboard` on `url`, served from `folder` (its ./artifacts), until the block
    ends: yields (base URL, the first study's summary from its API, the server's output list,
    filled once the server stopped)."""
    import json
    import time
    import urllib.request

    port = free_port()
    server = subprocess.Popen([OPTSEARCH, "dashboard", "--storage", url, "--port", str(port)],
                              cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base, output = f"http://127.0.0.1:{port}", []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=2) as response:
                    summaries = json.load(response)["study_summaries"]
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "dashboard did not start"
                time.sleep(0.3)
        yield base, summaries[0], output
    finally:
        server.terminate()
        output.append(server.communicate(timeout=30)[0])


@contextlib.contextmanager
def browser_page():
    """A page of headless Chromium (Playwright); under CI=true a missing Chromium fails."""
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is missing under CI=true (.ci/run installs it)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=path,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()
