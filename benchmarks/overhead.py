"""Trial overhead on builtin:cpu-bench.

The share of a trial's wall time (Optuna's start to complete) not spent in pipeline inference
(timed batches + the warm-up batch): CLIP scoring, PSNR/SSIM, accelerator set-up and restore,
sampling, storage writes and the image-grid artifact. Target: 3 % or less.
"""

from __future__ import annotations

import time

from benchmarks.common import ROOT, machine, run_study, scratch, table
from optsearch import load_spec
from optsearch.optimize.study import FINISHED


def main(n_trials: int = 4) -> None:
    spec = load_spec(ROOT / "studies" / "cpu-bench.toml")
    spec.search.n_trials = n_trials
    spec.search.early_stop = False
    folder = scratch()
    started = time.perf_counter()
    worker = run_study(spec, folder)
    total = time.perf_counter() - started
    rows, shares = [], []
    for trial in worker.study.get_trials(states=FINISHED):
        attrs = trial.user_attrs
        wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
        inference = attrs["inference_seconds"] + attrs["warmup_seconds"]
        share = 1 - inference / wall
        shares.append(share)
        rows.append([trial.number, attrs["combo"], wall, attrs["inference_seconds"],
                     attrs["warmup_seconds"], attrs["scoring_seconds"], f"{100 * share:.2f} %"])
    print(f"# trial overhead, builtin:cpu-bench ({machine()})")
    print(table(["trial", "combo", "wall s", "timed s", "warm-up s", "scoring s", "overhead"], rows))
    print(f"mean overhead: {100 * sum(shares) / len(shares):.2f} % (target <= 3 %)")
    print(f"trials/hour: {3600 * len(rows) / total:.1f} (whole run incl. model load and baseline: "
          f"{total:.0f} s); steady state: {3600 / (sum(r[2] for r in rows) / len(rows)):.1f}")

