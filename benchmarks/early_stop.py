"""Time saved by early stop on a study where about half the space is infeasible.

The same 16 random trials (fixed sampler seed) on builtin:tiny with 8 batches per trial, once with
early stop and once without; the PSNR limit is set near the median so about half the trials fail it.
"""

from __future__ import annotations

import time

from benchmarks.common import machine, run_study, scratch, table
from optsearch.optimize.objectives import best_overall
from optsearch.optimize.study import FINISHED
from optsearch.study_spec import spec_from_dict


def spec(early_stop: bool, limit: float):
    return spec_from_dict({
        "name": "early-stop",
        "model": {"id": "builtin:tiny", "device": "cpu", "dtype": "float32", "steps": 20},
        "prompts": {"source": "builtin", "num_samples": 16, "batch_size": 2},
        "quality": {"clip_model": "builtin:tiny", "clip_pretrained": "none", "metric": "psnr",
                    "limit": limit},
        "search": {"accelerators": ["deepcache", "tome"], "sampler": "random", "seed": 3,
                   "n_trials": 16, "early_stop": early_stop, "min_batches": 2},
        "space": {"deepcache": {"cache_interval": [2, 8], "cache_branch_id": [0, 3]},
                  "tome": {"ratio": [0.1, 0.7]}},
        "artifacts": {"grid_prompts": 0},
    })


def main(limit: float = 36.0) -> None:
    rows, results = [], {}
    for early_stop in (False, True):
        started = time.perf_counter()
        worker = run_study(spec(early_stop, limit), scratch())
        total = time.perf_counter() - started
        trials = worker.study.get_trials(states=FINISHED)
        trial_seconds = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials)
        infeasible = sum(t.user_attrs["constraints"]["quality"] > 0 for t in trials)
        stopped = sum(bool(t.user_attrs.get("early_stopped")) for t in trials)
        batches = sum(t.user_attrs.get("batches_evaluated", 0) for t in trials)
        best = best_overall(worker.study, worker.spec)
        results[early_stop] = trial_seconds
        rows.append(["on" if early_stop else "off", len(trials), infeasible, stopped, batches,
                     trial_seconds, total, best.number if best else None,
                     best.user_attrs["speedup"] if best else None])
    print(f"# early stop, builtin:tiny, 16 random trials x 8 batches, PSNR limit {limit} ({machine()})")
    print(table(["early stop", "trials", "infeasible", "early-stopped", "batches run", "trial s",
                 "total s", "best trial", "best speedup"], rows))
    saved = results[False] - results[True]
    print(f"time saved on trials: {saved:.1f} s ({100 * saved / results[False]:.0f} %)")

