"""How many DBCache trials skip nothing (are inert) with the default threshold range, the range
calibrated on the first prompt over every step (optsearch before 2026-12-05), and the range
calibrated as the worker now does it (the search's first batch, past the longest warm-up the spec
searches), on the builtin diffusion transformers, CPU.

The answer is defined on one measurement and tested on another: each range comes from one
calibration call; inertness is then measured on the search's first batch (where the worker's
"inert" early stop looks) and on a batch of other prompts the calibration never saw (what a
served prompt meets). `thresholds` points per range, one in the middle of each of as many equal
bins (the spread TPE's first trials cover, endpoints excluded), Fn=1, Bn=0, at the shortest and
the longest warm-up searched, `steps` steps, batches of `batch_size`.

    python -m benchmarks inert-ranges      # two to three minutes on 2 cores
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import machine, table
from optsearch.accelerators import AppliedSetting, dbcache, params_of
from optsearch.measure.generation import GenerationConfig, generate
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import builtin_prompts

MODELS = ("builtin:tiny-flux", "builtin:tiny-sd3", "builtin:tiny-qwen-image")


def main(thresholds: int = 8, batch_size: int = 2, steps: int = 12,
         short_warmup: int = 1, long_warmup: int = 4) -> None:
    warmups = (short_warmup, long_warmup)
    default = params_of("dbcache")["residual_diff_threshold"].default
    texts = builtin_prompts()
    first, other = texts[:batch_size], texts[batch_size:2 * batch_size]
    config = GenerationConfig(steps=steps, guidance_scale=3.5, batch_size=batch_size)
    rows = []
    for model in MODELS:
        pipe = load_pipeline(model, device="cpu", dtype="float32")

        def calibrated(prompts: list[str], largest: dict, pipe=pipe) -> list[float]:
            return dbcache.calibrate(pipe, lambda: list(generate(pipe, prompts, config, warmup=False)),
                                     largest)["auto"]["residual_diff_threshold"]

        ranges = {"default": default,
                  "first prompt, all steps": calibrated(first[:1], {}),
                  "first batch, past warm-up": calibrated(first, {"max_warmup_steps": max(warmups)})}
        for name, (low, high) in ranges.items():
            edges = np.linspace(low, high, thresholds + 1)
            inert = {"first": 0, "other": 0}
            fractions = []
            for threshold in (edges[:-1] + edges[1:]) / 2:
                for warmup in warmups:
                    setting = {"dbcache": {"residual_diff_threshold": float(threshold),
                                           "max_warmup_steps": warmup}}
                    for batch, prompts in (("first", first), ("other", other)):
                        with AppliedSetting(pipe, setting) as applied:
                            list(generate(pipe, prompts, config, setting=applied, warmup=False))
                            fraction = applied.computed_fraction()
                        inert[batch] += fraction >= 1.0
                        fractions.append(fraction)
            trials = thresholds * len(warmups)
            rows.append([model, name, f"[{low:.3f}, {high:.3f}]", f"{inert['first']}/{trials}",
                         f"{inert['other']}/{trials}", f"{min(fractions):.2f}-{max(fractions):.2f}"])
    print(machine())
    print(f"{thresholds} thresholds x warm-ups {list(warmups)}, batches of {batch_size}, {steps} steps")
    print(table(["model", "range from", "threshold range", "inert: first batch",
                 "inert: other prompts", "computed share"], rows))
