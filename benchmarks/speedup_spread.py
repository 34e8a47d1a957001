"""How steady is a reported speedup, and how honest is its interval?

One fixed setting (DeepCache 3/0) on builtin:cpu-bench at 128 px, timed again and again in one
process, as a long study would. Each "worker" (a round) times its own baseline at start, then runs
K trials of the setting, each preceded by a re-timed baseline. The same trial timings give three
speedups:

- shared:   against the very first baseline (what a worker reusing another's baseline reported);
- own:      against the baseline its own worker timed when it started (today's rule);
- re-timed: against a baseline timed right before the trial (`search.retime_baseline_every = 1`).

Coverage: how often a repeat trial's speedup falls inside the first trial's interval (own
baseline), over all ordered pairs of trials; and how often each interval covers the mean of all.
"""

from __future__ import annotations

import statistics

from benchmarks.common import machine, table
from optsearch.measure.evaluate import Evaluator
from optsearch.measure.generation import GenerationConfig
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import load_prompts
from optsearch.measure.quality import ClipScorer
from optsearch.measure.speedup import speedup_interval

SETTING = {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}


def main(rounds: int = 4, trials_per_round: int = 3, num_samples: int = 8, batch_size: int = 2) -> None:
    pipe = load_pipeline("builtin:cpu-bench", device="cpu", dtype="float32")
    config = GenerationConfig(steps=20, height=128, width=128, guidance_scale=7.5,
                              batch_size=batch_size, seed=42)
    evaluator = Evaluator(pipe, ClipScorer("builtin:tiny", "none"), load_prompts("builtin", num_samples),
                          config)
    reference = evaluator.baseline()
    shared = reference
    trials = []  # (shared speedup, own speedup, re-timed speedup, own interval)
    baseline_seconds = [reference.seconds_per_image]
    for _ in range(rounds):
        own = evaluator.baseline(scored=reference)
        baseline_seconds.append(own.seconds_per_image)
        for _ in range(trials_per_round):
            fresh = evaluator.baseline(scored=reference)
            baseline_seconds.append(fresh.seconds_per_image)
            seconds, batches = evaluator.time_setting(SETTING)
            trials.append({
                "shared": shared.seconds_per_image / seconds,
                "own": own.seconds_per_image / seconds,
                "retimed": fresh.seconds_per_image / seconds,
                "own_interval": speedup_interval(own.batch_seconds, batches, 0.95,
                                                 own.seconds_per_image / seconds),
                "retimed_interval": speedup_interval(fresh.batch_seconds, batches, 0.95,
                                                     fresh.seconds_per_image / seconds),
            })

    def cv(values):
        return 100 * statistics.stdev(values) / statistics.mean(values)

    print(f"# speedup spread: DeepCache 3/0, builtin:cpu-bench 128 px, 20 steps, {num_samples} prompts, "
          f"batch {batch_size}, {rounds} workers x {trials_per_round} trials ({machine()})")
    rows = []
    for name in ("shared", "own", "retimed"):
        values = [t[name] for t in trials]
        rows.append([name, statistics.mean(values), statistics.stdev(values), f"{cv(values):.1f} %",
                     min(values), max(values)])
    print(table(["baseline", "mean speedup", "sd", "CV", "min", "max"], rows))
    print(f"baseline s/image over the run: CV {cv(baseline_seconds):.1f} % "
          f"({min(baseline_seconds):.3f}-{max(baseline_seconds):.3f})")

    print("\n# coverage of the 95 % speedup interval")
    rows = []
    for name in ("own", "retimed"):
        intervals = [t[f"{name}_interval"] for t in trials]
        values = [t[name] for t in trials]
        pairs = [(i, j) for i in range(len(trials)) for j in range(len(trials)) if i != j]
        repeat = sum(intervals[i].low <= values[j] <= intervals[i].high for i, j in pairs) / len(pairs)
        mean = statistics.mean(values)
        of_mean = sum(iv.low <= mean <= iv.high for iv in intervals) / len(intervals)
        width = statistics.median(iv.high / iv.low for iv in intervals)
        rows.append([name, len(trials), f"{100 * repeat:.0f} %", f"{100 * of_mean:.0f} %", width])
    print(table(["baseline", "trials", "repeat inside first's interval", "interval covers the mean",
                 "median high/low"], rows))

