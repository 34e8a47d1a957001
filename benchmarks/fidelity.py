"""Measurement fidelity on builtin:cpu-bench.

The speedup a study reports for a setting, against standalone timings of the same setting in fresh
processes (`optsearch evaluate --json`), and the coefficient of variation of repeated timings.
Target: within 5 %.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import ROOT, machine, run_study, scratch, table
from optsearch import load_spec

SETTING = {"deepcache.cache_interval": 3, "deepcache.cache_branch_id": 0, "tome.ratio": 0.5,
           "tome.max_downsample": 1, "tgate.gate_step": 10}
SPEC = ROOT / "studies" / "cpu-bench.toml"


def standalone() -> dict:
    optsearch = str(Path(sys.executable).with_name("optsearch"))
    args = [optsearch, "evaluate", str(SPEC), "--json", "--quiet"]
    for key, value in SETTING.items():
        args += ["--set", f"{key}={value}"]
    return json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)


def main(repeats: int = 3) -> None:
    spec = load_spec(SPEC)
    spec.search.n_trials = 1
    worker = run_study(spec, scratch(), enqueue=[SETTING])
    trial = worker.study.trials[0]
    study_speedup = trial.user_attrs["speedup"]
    runs = [standalone() for _ in range(repeats)]
    speedups = [r["speedup"] for r in runs]
    rows = [["study trial", trial.user_attrs["baseline_seconds_per_image"],
             trial.user_attrs["seconds_per_image"], study_speedup]]
    rows += [[f"standalone {i + 1}", r["baseline_seconds_per_image"], r["seconds_per_image"],
              r["speedup"]] for i, r in enumerate(runs)]
    print(f"# measurement fidelity, builtin:cpu-bench, DeepCache 3/0 + ToMe 0.5 + T-GATE 10 ({machine()})")
    print(table(["run", "baseline s/img", "setting s/img", "speedup"], rows))
    mean = statistics.mean(speedups)
    print(f"study vs standalone mean speedup: {100 * (study_speedup / mean - 1):+.1f} % (target within 5 %)")

    def cv(values):
        return 100 * statistics.stdev(values) / statistics.mean(values)

    print(f"coefficient of variation over {repeats} fresh processes: speedup {cv(speedups):.1f} %, "
          f"baseline s/img {cv([r['baseline_seconds_per_image'] for r in runs]):.1f} %, "
          f"setting s/img {cv([r['seconds_per_image'] for r in runs]):.1f} %")

