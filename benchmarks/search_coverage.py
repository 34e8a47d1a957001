"""Does a search trial's speedup interval cover a repeat measured in a fresh pass (issue 25, item 1)?

What a study does, in one process: W "workers" one after another, each timing its own baseline,
then measuring K settings (a trial each: 4 batches of 2 on builtin:cpu-bench, 128 px, 20 steps)
and timing one baseline batch between trials (a probe, every trial until the pass noise is
measured, then every `probe_every`). Each trial's 95 % interval is computed twice from the same
timings: from its batches alone (before), and with the pass term estimated from the probes
recorded so far, pooled over the workers before it (now, optimize/pass_noise.py; the prior until
measured); and the repeat range `study show` prints beside the winner (speedup.repeat_range: the
now-interval sqrt(2) wider on the log scale, where one fresh measurement should read).

The answer is not graded on the measurement it came from: a setting's interval from one worker is
checked against the same setting's speedup measured by another worker (a fresh baseline, a fresh
pass), over all ordered pairs. Also: how often an interval covers the setting's mean over all
workers, the intervals' width, and the probes' share of the device time.

    python -m benchmarks search-coverage --workers 6        # about 6 minutes on 2 idle cores
"""

from __future__ import annotations

import math
import statistics
import time

from benchmarks.common import machine, table
from optsearch.measure.evaluate import Evaluator
from optsearch.measure.generation import GenerationConfig
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import load_prompts
from optsearch.measure.quality import ClipScorer
from optsearch.measure.speedup import repeat_range, speedup_interval
from optsearch.optimize.pass_noise import assumed, estimate, probe_due

SETTINGS = {
    "deepcache 3/0": {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}},
    "tome 0.5": {"tome": {"ratio": 0.5, "max_downsample": 1}},
    "steps 12": {"steps": {"num_inference_steps": 12}},
}


def main(workers: int = 6, probe_every: int = 3, prior: float = 0.05, num_samples: int = 8,
         batch_size: int = 2) -> None:
    started = time.perf_counter()
    pipe = load_pipeline("builtin:cpu-bench", device="cpu", dtype="float32")
    config = GenerationConfig(steps=20, height=128, width=128, guidance_scale=7.5,
                              batch_size=batch_size, seed=42)
    evaluator = Evaluator(pipe, ClipScorer("builtin:tiny", "none"),
                          load_prompts("builtin", num_samples), config)
    reference = evaluator.baseline()  # images and scores; every worker times its own
    records, measured = [], []  # the study's timing records; (worker, setting, speedup, intervals)
    seconds = {"probes": 0.0, "trials": 0.0, "baselines": 0.0}
    for worker in range(workers):
        clock = time.perf_counter()
        own = evaluator.baseline(scored=reference)
        seconds["baselines"] += time.perf_counter() - clock
        record = {"fingerprint": "bench", "probes": [],
                  "timings": [{"batch_seconds": own.batch_seconds,
                               "seconds_per_image": own.seconds_per_image}]}
        records.append(record)
        since_probe = 0
        for name, setting in SETTINGS.items():
            if probe_due(since_probe, probe_every):
                clock = time.perf_counter()
                record["probes"].append({"seconds_per_image": evaluator.probe()})
                seconds["probes"] += time.perf_counter() - clock
                since_probe = 0
            noise = estimate(records, "bench", prior)
            clock = time.perf_counter()
            per_image, batches = evaluator.time_setting(setting)
            seconds["trials"] += time.perf_counter() - clock
            since_probe += 1
            speedup = own.seconds_per_image / per_image
            measured.append({
                "worker": worker, "setting": name, "speedup": speedup,
                "before": speedup_interval(own.batch_seconds, batches, 0.95, speedup),
                "now": speedup_interval(own.batch_seconds, batches, 0.95, speedup, pass_noise=noise),
                "noise": noise, "batches": batches, "baseline": own.batch_seconds,
            })

    print(f"# search-trial coverage: {workers} workers x {len(SETTINGS)} settings, builtin:cpu-bench "
          f"128 px, 20 steps, {num_samples} prompts in batches of {batch_size}, probe_every "
          f"{probe_every}, prior {100 * prior:.0f} % ({machine()})")
    for assumed_noise in (0.03, 0.05, 0.08, 0.10):  # a fixed term instead of the estimate
        for m in measured:
            m[f"fixed {assumed_noise}"] = speedup_interval(m["baseline"], m["batches"], 0.95,
                                                          m["speedup"], pass_noise=assumed(assumed_noise))
    for m in measured:  # what `study show` prints beside the winner: where a repeat should read
        m["repeat"] = repeat_range(m["now"])
    rows = []
    for scheme in ("before", "now", "repeat", "fixed 0.03", "fixed 0.05", "fixed 0.08", "fixed 0.1"):
        inside = pairs = of_mean = 0
        widths = []
        for first in measured:
            same = [m for m in measured if m["setting"] == first["setting"]]
            mean = math.exp(statistics.mean(math.log(m["speedup"]) for m in same))
            interval = first[scheme]
            of_mean += interval.low <= mean <= interval.high
            widths.append(interval.high / interval.low)
            for repeat in same:
                if repeat["worker"] != first["worker"]:
                    pairs += 1
                    inside += interval.low <= repeat["speedup"] <= interval.high
        label = ("batches alone (before)" if scheme == "before"
                 else "with the estimated pass term (now)" if scheme == "now"
                 else "repeat range: the pass-term interval x sqrt(2) on the log scale"
                 if scheme == "repeat"
                 else f"a fixed {100 * float(scheme.split()[1]):.0f} % pass term")
        rows.append([label, f"{inside}/{pairs}", f"{100 * inside / pairs:.0f} %",
                     f"{100 * of_mean / len(measured):.0f} %", f"x{statistics.median(widths):.2f}"])
    print(table(["interval", "repeat inside", "coverage", "covers the setting's mean",
                 "median high/low"], rows))
    rows = []
    for name in SETTINGS:
        values = [m["speedup"] for m in measured if m["setting"] == name]
        spread = 100 * statistics.stdev(values) / statistics.mean(values)
        rows.append([name, f"{statistics.mean(values):.2f}", f"{spread:.1f} %"])
    print(table(["setting", "mean speedup", "CV over workers"], rows))
    last = measured[-1]["noise"]
    probes = sum(len(r["probes"]) for r in records)
    device = sum(seconds.values())
    print(f"pass noise at the end: {last.percent:.1f} % per pass ({probes} probes, df {last.df}); "
          f"probes took {100 * seconds['probes'] / device:.1f} % of the device time "
          f"({seconds['probes']:.1f} of {device:.1f} s); {time.perf_counter() - started:.0f} s in all")
