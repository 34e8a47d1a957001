"""Does a confirmation's speedup interval cover a repeat? The A B B A rounds interval (issue 25)
against the earlier one (A B rounds, every batch pooled as independent), on the same passes.

One setting (tiny-flux, MagCache at its defaults) is confirmed `pairs` x 2 times, each time
afresh: `rounds` A B B A rounds of 4 prompts in batches of 2 (the first two passes of each round
also give the earlier scheme's A B round). For each pair, the second measurement's speedup is
checked against the first's 95 % interval: the honest coverage a user meets when re-measuring.
A nominal 95 % interval covers a repeat's point estimate less often than 95 % even when exact
(both carry noise: about 83 % for equal noise and a known spread), so the figure to read is how far
each scheme falls below that.

    python -m benchmarks confirm-coverage --pairs 15      # about 6 minutes on 2 cores
"""

from __future__ import annotations

import math
import time

from benchmarks.common import machine, table
from optsearch.accelerators import AppliedSetting, magcache
from optsearch.measure.generation import GenerationConfig, generate
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import builtin_prompts
from optsearch.measure.speedup import rounds_interval, speedup_interval

SETTING = {"magcache": {}}


def main(pairs: int = 15, rounds: int = 3) -> None:
    started = time.perf_counter()
    pipe = load_pipeline("builtin:tiny-flux", device="cpu", dtype="float32")
    config = GenerationConfig(steps=20, guidance_scale=3.5, batch_size=2)
    prompts = builtin_prompts()[:4]

    def passes(setting=None) -> list[float]:  # seconds per image of each batch of one pass
        return [b.seconds_per_image for b in generate(pipe, prompts, config, setting=setting,
                                                      warmup=False)]

    ratios = magcache.measure(pipe, config.steps, lambda: passes())["mag_ratios"]

    def measure():
        abba, base_batches, fast_batches = [], [], []
        for _ in range(rounds):
            first = passes()
            with AppliedSetting(pipe, SETTING, {"magcache": {"mag_ratios": ratios}}) as run:
                fast = [passes(run), passes(run)]
            last = passes()
            base_batches += first
            fast_batches += fast[0]  # the earlier scheme: A B per round, batches pooled
            base = (sum(first) + sum(last)) / (len(first) + len(last))
            abba.append(base / (sum(fast[0] + fast[1]) / len(fast[0] + fast[1])))
        old = speedup_interval(base_batches, fast_batches, 0.95,
                               (sum(base_batches) / len(base_batches))
                               / (sum(fast_batches) / len(fast_batches)))
        return old, rounds_interval(abba, 0.95)

    passes()  # warm
    covered = {"A B rounds, batches pooled (before)": 0, "A B B A rounds, t over rounds (now)": 0}
    widths = {key: [] for key in covered}
    for index in range(pairs):
        first, second = measure(), measure()
        for key, a, b in zip(covered, first, second, strict=True):
            covered[key] += a.low <= b.speedup <= a.high
            widths[key].append(math.log(a.high / a.low))
        print(f"pair {index + 1}: before {first[0]} -> {second[0].speedup:.2f}; "
              f"now {first[1]} -> {second[1].speedup:.2f}", flush=True)
    rows = [[key, f"{covered[key]}/{pairs}", f"{100 * covered[key] / pairs:.0f}%",
             f"x{math.exp(sum(widths[key]) / pairs):.2f}"] for key in covered]
    print(f"\n# tiny-flux, {SETTING}, 4 prompts, batch 2, {rounds} rounds, {pairs} pairs "
          f"({machine()})")
    print(table(["interval", "repeat inside", "coverage", "mean high/low"], rows))
    print(f"total {time.perf_counter() - started:.0f} s")
