"""Storage throughput with a near-zero-cost objective.

1, 2 and 4 worker processes on SQLite and on PostgreSQL (local, a scratch database), each running
ask -> suggest 4 params -> 20 user attrs + a constraint -> tell (what a real trial writes), for a
fixed time, with Optuna's RandomSampler so that sampling costs nothing. Prints trials per minute and
storage milliseconds per trial.
"""

from __future__ import annotations

import multiprocessing
import time

import optuna

from benchmarks.common import drop_pg_database, machine, pg_database, scratch, table


def _worker(url: str, seconds: float, results) -> None:
    from optsearch.storage.rdb import open_storage

    storage = open_storage(url, heartbeat_interval=None)
    study = optuna.load_study(study_name="bench", storage=storage,
                              sampler=optuna.samplers.RandomSampler())
    count, busy, end = 0, 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        trial = study.ask()
        speed = sum(trial.suggest_int(f"p{i}", 0, 10) for i in range(4))
        for i in range(20):
            trial.set_user_attr(f"metric_{i}", float(i))
        trial.set_constraint("quality", speed - 20.0)
        study.tell(trial, float(speed))
        busy += time.perf_counter() - start
        count += 1
    results.put((count, busy))


def measure(url: str, workers: int, seconds: float) -> tuple[float, float]:
    from optsearch.storage.rdb import open_storage

    optuna.create_study(study_name="bench", storage=open_storage(url, heartbeat_interval=None))
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(url, seconds, results)) for _ in range(workers)]
    for process in processes:
        process.start()
    counts = [results.get() for _ in processes]
    for process in processes:
        process.join()
    trials = sum(c for c, _ in counts)
    return trials * 60 / seconds, 1000 * sum(b for _, b in counts) / trials


def main(seconds: float = 15.0) -> None:
    rows = []
    for backend in ("sqlite", "postgresql"):
        for workers in (1, 2, 4):
            if backend == "sqlite":
                url, name = f"sqlite:///{scratch() / 'bench.db'}", None
            else:
                name, url = pg_database()
            try:
                per_minute, storage_ms = measure(url, workers, seconds)
            finally:
                if name:
                    drop_pg_database(name)
            rows.append([backend, workers, per_minute, storage_ms])
            print(f"{backend} x{workers}: {per_minute:.0f} trials/min", flush=True)
    print(f"\n# storage throughput, near-zero objective, {seconds:.0f} s per run ({machine()})")
    print(table(["storage", "workers", "trials/min", "storage ms/trial"], rows))

