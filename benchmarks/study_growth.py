"""What a worker spends on each trial outside the pipeline, as the study grows.

One worker runs `--n-trials` trials of a near-free setting (builtin:tiny, 2 prompts, 8 steps:
inference takes a fraction of a second) on a space of some 4,000 computations (DeepCache's 20
settings times ToMe's merge counts), more than the trials. Each trial's cycle is the time from its
start to the next trial's start; the part of it outside the trial's comparison (`wall_seconds`:
warm-up, timed batches, scoring) is the bookkeeping: sampling, the storage's reads and writes,
the winner and the dashboard's note, the image grid, the early-stop rule. The peak memory of each
trial's timed batches (on a CPU the process's resident set) shows whether a long-running worker
grows. Probes are off (`probe_every = 0`: they are baseline inference, not bookkeeping). Printed
per block of trial numbers, so that what grows with the study shows. A trial that copies an
earlier one's result (a ratio that merges the same tokens) is counted apart: it measures nothing.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.common import ROOT, drop_pg_database, machine, pg_database, run_study, scratch, table
from optsearch import load_spec


def spec_for(n_trials: int):
    spec = load_spec(ROOT / "studies" / "tiny-demo.toml")
    spec.name = "study-growth"
    spec.model.steps = 8
    spec.prompts.num_samples = spec.prompts.batch_size = 2
    spec.search.n_trials = n_trials
    spec.search.probe_every = 0
    spec.search.early_stop = False
    spec.search.warm_start = []
    return spec


def overheads(url: str, name: str) -> tuple[list[tuple[int, float, float, float | None]], list[float]]:
    """(per measured trial: its number, cycle seconds, seconds outside the comparison, peak GiB
    of its timed batches: on a CPU the process's resident set, so a worker that leaks shows it;
    the cycle seconds of each trial that copied an earlier result)."""
    import optuna

    trials = sorted((t for t in optuna.load_study(study_name=name, storage=url).trials
                     if t.datetime_start and "wall_seconds" in t.user_attrs), key=lambda t: t.number)
    rows, copies = [], []
    for trial, following in zip(trials, trials[1:], strict=False):
        cycle = (following.datetime_start - trial.datetime_start).total_seconds()
        if "reused_from" in trial.user_attrs:  # its wall_seconds are the copied trial's
            copies.append(cycle)
            continue
        rows.append((trial.number, cycle, cycle - trial.user_attrs["wall_seconds"],
                     trial.user_attrs.get("peak_memory_gib")))
    return rows, copies


def main(n_trials: int = 300, block: int = 50, storage: str = "sqlite") -> None:
    spec = spec_for(n_trials)
    folder = scratch()
    database, url = pg_database() if storage == "postgresql" else (None, f"sqlite:///{folder / 'bench.db'}")
    try:
        started = time.perf_counter()
        run_study(spec, folder, url=url)
        total = time.perf_counter() - started
        rows, copies = overheads(url, spec.name)
    finally:
        if database:
            drop_pg_database(database)
    print(f"# bookkeeping per trial as the study grows: builtin:tiny, {storage} ({machine()})")
    out = []
    for start in range(0, n_trials, block):
        chunk = [r for r in rows if start <= r[0] < start + block]
        if chunk:
            peaks = [r[3] for r in chunk if r[3] is not None]
            out.append([f"{start}-{start + block - 1}", len(chunk),
                        statistics.median(r[1] for r in chunk), statistics.median(r[2] for r in chunk),
                        max(r[2] for r in chunk), f"{statistics.median(peaks):.3f}" if peaks else "-"])
    print(table(["trials", "n", "cycle s (median)", "outside comparison s (median)", "max",
                 "peak GiB (median)"], out))
    if copies:
        print(f"copies of an earlier result (the same tokens merged): {len(copies)}, "
              f"cycle {statistics.median(copies):.3f} s (median)")
    print(f"whole run: {total:.0f} s for {n_trials} measured trials")

