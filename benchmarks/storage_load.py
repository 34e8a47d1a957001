"""Many workers on one study: PostgreSQL directly and through the storage proxy.

N worker processes run optsearch's own `Worker` (its loop, sharing, early-stop rule, records,
notes, winner mark, heartbeat) on one study of builtin:tiny, with an evaluator that sleeps a set
time per batch instead of generating (`SleepingEvaluator`): everything but the pipeline is real,
so 2 cores host 32-64 workers. The workers are forked from one process that imported optsearch and
built the pipeline once (a worker's imports alone hold 1.3 GB; forked, they share them).

For each storage (PostgreSQL directly, or `optsearch storage-proxy` in front of it) and N:
trials a second, the database connections held (pg_stat_activity, sampled), the p50/p95 of a
worker's per-trial bookkeeping (a step's wall time less the evaluator's sleeps: sampler, storage
reads and writes, early-stop rule, winner mark), workers that ended with an error, and the
checks: no trial lost (none left RUNNING, every FAIL re-queued and finished) and no setting
measured twice.

    python -m benchmarks storage-load --workers 8,32,64 --seconds 60
    python -m benchmarks storage-load --growth 100,1000,5000      # bookkeeping vs finished trials
    python -m benchmarks storage-load --workers 16 --restart-at 25   # PostgreSQL restarted mid-run
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import optuna
import psycopg
import torch

from benchmarks.common import PG_ADMIN, drop_pg_database, machine, pg_database, table
from optsearch.measure.comparison import Comparison
from optsearch.measure.evaluate import Baseline, Evaluator
from optsearch.measure.generation import GenerationConfig
from optsearch.measure.models import load_pipeline
from optsearch.optimize.create import create_study
from optsearch.optimize.worker import Worker, WorkerOptions
from optsearch.storage.rdb import open_storage
from optsearch.study_spec import spec_from_dict

PG_RESTART = ["pg_ctlcluster", "15", "main", "restart"]
PROMPTS, BATCH = 4, 2
optuna.logging.set_verbosity(optuna.logging.ERROR)


def spec(n_trials: int):
    return spec_from_dict({
        "name": "load", "model": {"id": "builtin:tiny", "steps": 4, "device": "cpu", "dtype": "float32"},
        "prompts": {"num_samples": PROMPTS, "batch_size": BATCH},
        "quality": {"metric": "psnr", "limit": 30.0},
        "search": {"accelerators": ["deepcache", "tome"], "n_trials": n_trials, "n_startup_trials": 10,
                   "warm_start": []},
        "space": {"tome": {"ratio": [0.1, 0.7]}},
        "artifacts": {"grid_prompts": 0},
    })


class SleepingEvaluator(Evaluator):
    """An Evaluator whose pipeline runs are sleeps: `sleep` seconds a batch; speed and PSNR follow
    from the setting (deterministic, with 3 % noise), so the study has a landscape to search."""

    sleep = 1.0
    slept = 0.0  # seconds slept so far: a step's wall time less these is its bookkeeping

    def derive(self, **changes) -> SleepingEvaluator:
        derived = super().derive(**changes)
        derived.__class__ = SleepingEvaluator
        return derived

    def _nap(self) -> None:
        time.sleep(self.sleep)
        SleepingEvaluator.slept += self.sleep

    def baseline(self, scored: Baseline | None = None) -> Baseline:
        seconds = []
        for _ in range(self.n_batches):
            self._nap()
            seconds.append(1.0 * float(np.exp(np.random.normal(0, 0.03))))
        n = len(self.prompts)
        return Baseline(np.zeros((n, 8, 8, 3), np.uint8), float(np.mean(seconds)), np.full(n, 0.3),
                        torch.zeros(n, 4), seconds, None)

    def probe(self) -> float:
        self._nap()
        return float(np.exp(np.random.normal(0, 0.03)))

    def compare(self, setting, baseline: Baseline, stop_when=None, keep_images: int = 0,
                pass_noise=None) -> Comparison:
        deepcache, tome = setting.get("deepcache", {}), setting.get("tome", {})
        interval = deepcache.get("cache_interval", 1)
        branch = deepcache.get("cache_branch_id", 0)
        speed = 1 + 0.3 * (interval - 1) * (1 - 0.2 * branch) + tome.get("ratio", 0)
        psnr = 48 - 2.5 * interval - 6 * tome.get("ratio", 0)
        result = Comparison(setting=dict(setting), num_samples=len(self.prompts), batch_size=BATCH,
                            n_batches=self.n_batches, confidence=self.confidence,
                            baseline_seconds_per_image=baseline.seconds_per_image,
                            baseline_batch_seconds=list(baseline.batch_seconds), pass_noise=pass_noise)
        for _ in range(self.n_batches):
            self._nap()
            per_image = baseline.seconds_per_image / speed * float(np.exp(np.random.normal(0, 0.03)))
            result.batch_seconds.append(per_image)
            result.inference_seconds += per_image * BATCH
            result.psnr += [psnr + float(np.random.normal(0, 0.5)) for _ in range(BATCH)]
            result.ssim += [0.9] * BATCH
            result.clip_image_cosine += [0.99] * BATCH
            result.clip_scores += [0.3] * BATCH
            result.baseline_clip_scores += [0.3] * BATCH
            if result.batch_done(stop_when):
                break
        return result


class TimedWorker(Worker):
    """The Worker, with each step's bookkeeping (wall time less the evaluator's sleeps) kept."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bookkeeping: list[float] = []

    def _step(self, target: int, bar) -> bool:
        start, slept, ran = time.perf_counter(), SleepingEvaluator.slept, self.trials_run
        going_on = super()._step(target, bar)
        if self.trials_run > ran:
            self.bookkeeping.append(time.perf_counter() - start - (SleepingEvaluator.slept - slept))
        return going_on


def _child(url: str, seconds: float, sleep: float, evaluator: Evaluator, out: str, artifacts: str,
           profile: bool = False) -> None:
    """One worker process; with `profile`, its bookkeeping's largest items are printed (cProfile)."""
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            _child(url, seconds, sleep, evaluator, out, artifacts, profile=False)
        finally:
            profiler.disable()
            stats = pstats.Stats(profiler).sort_stats("cumulative")
            stats.print_stats(r"optsearch/(optimize|storage)|optuna/(samplers|study|storages)", 25)
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    np.random.seed(os.getpid())
    SleepingEvaluator.sleep = sleep
    record = {"bookkeeping": [], "error": None, "trials": 0}
    try:
        options = WorkerOptions(progress=False, timeout=seconds, poll_interval=0.5, heartbeat_interval=5,
                                grace_period=20, artifact_dir=artifacts)
        worker = TimedWorker(url, "load", options, evaluator=evaluator)
        try:
            record["trials"] = worker.run()
        finally:
            record["bookkeeping"] = worker.bookkeeping
    except BaseException as error:  # noqa: BLE001 - counted and printed by the parent
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    Path(out).write_text(json.dumps(record))
    if not profile:
        sys.stdout.flush()


def _connections(name: str) -> int | None:
    try:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=2) as admin:
            return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                 (name,)).fetchone()[0]
    except psycopg.Error:
        return None  # restarting


def _prefill(url: str, count: int) -> None:
    """`count` finished trials as a worker leaves them (a real trial's attrs, cloned)."""
    storage = open_storage(url, heartbeat_interval=None)
    study = optuna.load_study(study_name="load", storage=storage)
    model = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))[0]
    rng = np.random.default_rng(0)
    trials = []
    for _ in range(count):
        params = {**model.params, "tome.ratio": float(rng.uniform(0.1, 0.7))}
        trials.append(optuna.trial.create_trial(
            params=params, distributions=model.distributions, value=model.value,
            user_attrs={**model.user_attrs, "setting": {**model.user_attrs["setting"],
                                                         "tome": {"ratio": params["tome.ratio"]}}},
            system_attrs=model.system_attrs))
    for start in range(0, count, 500):
        study.add_trials(trials[start:start + 500])


def _proxy(url: str, port: int) -> subprocess.Popen:
    proxy = subprocess.Popen([sys.executable, "-m", "optsearch.cli", "storage-proxy", "--storage", url,
                              "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    line = proxy.stdout.readline()
    if "listening" not in line:
        raise RuntimeError(f"storage proxy did not start: {line}")
    return proxy


def run(evaluator: Evaluator, workers: int, via_proxy: bool, seconds: float, sleep: float,
        prefill: int = 0, restart_at: float | None = None, profile: bool = False) -> dict:
    name, url = pg_database("optsearch_load")
    proxy = None
    try:
        n_trials = prefill + 100_000
        create_study(spec(n_trials), open_storage(url, heartbeat_interval=None))
        folder = Path(tempfile.mkdtemp(prefix="optsearch-load-"))
        if prefill:  # one real trial first, as the model of the clones
            _child_once(url, evaluator, sleep, str(folder))
            _prefill(url, prefill)
        if via_proxy:
            proxy = _proxy(url, 13000 + os.getpid() % 1000)
        target = f"grpc://127.0.0.1:{13000 + os.getpid() % 1000}" if via_proxy else url
        storage = open_storage(url, heartbeat_interval=None)
        before = len(storage.get_all_trials(storage.get_study_id_from_name("load"), deepcopy=False))
        gc.freeze()  # the parent's objects stay shared with the forked workers
        context = multiprocessing.get_context("fork")
        processes = [context.Process(target=_child, args=(target, seconds, sleep, evaluator,
                                                          str(folder / f"{i}.json"), str(folder),
                                                          profile and i == 0))
                     for i in range(workers)]
        started = time.monotonic()
        for process in processes:
            process.start()
        peak, restarted = 0, False
        while any(p.is_alive() for p in processes):
            time.sleep(1.0)
            peak = max(peak, _connections(name) or 0)
            if restart_at is not None and not restarted and time.monotonic() - started > restart_at:
                subprocess.run(PG_RESTART, check=True)
                restarted = True
        wall = time.monotonic() - started
        records = [json.loads((folder / f"{i}.json").read_text()) if (folder / f"{i}.json").exists()
                   else {"bookkeeping": [], "error": "died", "trials": 0} for i in range(workers)]
        return {"records": records, "wall": wall, "peak_connections": peak,
                **_checks(storage, before)}
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait()
        drop_pg_database(name)


def _child_once(url: str, evaluator: Evaluator, sleep: float, artifacts: str) -> None:
    SleepingEvaluator.sleep = 0.01
    Worker(url, "load", WorkerOptions(progress=False, n_trials=1, artifact_dir=artifacts),
           evaluator=evaluator).run()
    SleepingEvaluator.sleep = sleep


def _checks(storage, before: int) -> dict:
    study_id = storage.get_study_id_from_name("load")
    trials = storage.get_all_trials(study_id, deepcopy=False)[before:]
    states = [t.state for t in trials]
    State = optuna.trial.TrialState
    measured = [json.dumps([t.user_attrs.get("fingerprint"), t.user_attrs.get("setting")], sort_keys=True)
                for t in trials if t.state in (State.COMPLETE, State.PRUNED)
                and "reused_from" not in t.user_attrs]
    failed = [t for t in trials if t.state == State.FAIL]
    requeued = sum(1 for t in trials if "failed_trial" in t.system_attrs)
    return {"finished": sum(s in (State.COMPLETE, State.PRUNED) for s in states),
            "running_left": states.count(State.RUNNING), "failed": len(failed), "requeued": requeued,
            "measured_twice": len(measured) - len(set(measured))}


def row(label: str, workers: int, result: dict) -> list:
    books = [b for r in result["records"] for b in r["bookkeeping"]]
    errors = [r["error"] for r in result["records"] if r["error"]]
    if errors:
        print(f"  {label} x{workers}: {len(errors)} workers ended with: {sorted(set(errors))[:3]}")
    return [label, workers, result["finished"], f"{result['finished'] / result['wall']:.2f}",
            result["peak_connections"],
            f"{1000 * np.percentile(books, 50):.0f}" if books else "-",
            f"{1000 * np.percentile(books, 95):.0f}" if books else "-", len(errors),
            result["running_left"], f"{result['failed']}/{result['requeued']}", result["measured_twice"]]


HEADERS = ["storage", "workers", "trials", "trials/s", "DB connections (peak)",
           "bookkeeping p50 ms", "p95 ms", "workers failed", "left RUNNING", "FAIL / re-queued",
           "measured twice"]


def main(workers: str = "8,32,64", seconds: float = 60.0, sleep: float = 1.0, growth: str = "",
         restart_at: float = 0.0, profile: int = 0, proxy: str = "both") -> None:
    """`profile` 1: one worker of each run prints where its bookkeeping went; `proxy`: "both",
    "direct" or "proxy" (the storages measured)."""
    spec_ = spec(1)
    pipe = load_pipeline("builtin:tiny", "cpu", "float32")
    evaluator = SleepingEvaluator(pipe, None, [f"prompt {i}" for i in range(PROMPTS)],
                                  GenerationConfig(steps=spec_.model.steps, batch_size=BATCH))
    threading.excepthook = lambda args: None  # a heartbeat thread killed by the restart: counted
    print(f"# {machine()}; a batch sleeps {sleep} s, {PROMPTS} prompts in batches of {BATCH}; "
          f"{seconds:.0f} s per run")
    rows = []
    storages = {"both": (False, True), "direct": (False,), "proxy": (True,)}[proxy]
    if growth:
        for count in (int(n) for n in growth.split(",")):
            for via_proxy in storages:
                label = f"{'proxy' if via_proxy else 'direct'}, {count} finished before"
                result = run(evaluator, int(workers.split(",")[0]), via_proxy, seconds, sleep, prefill=count,
                             profile=bool(profile))
                rows.append(row(label, int(workers.split(",")[0]), result))
                print(table(HEADERS, rows[-1:]), flush=True)
    else:
        for n in (int(n) for n in workers.split(",")):
            for via_proxy in storages:
                label = ("proxy" if via_proxy else "direct") + (", PG restarted" if restart_at else "")
                result = run(evaluator, n, via_proxy, seconds, sleep, restart_at=restart_at or None,
                             profile=bool(profile))
                rows.append(row(label, n, result))
                print(table(HEADERS, rows[-1:]), flush=True)
    print(table(HEADERS, rows))
