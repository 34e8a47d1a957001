"""How many DBCache trials skip nothing (are inert) with the default threshold range, the range
calibrated on the first prompt over every step at Fn=1 (optsearch before 2026-12-05), on the
search's first batch past the longest warm-up at Fn=1, and as the worker now does it: that, with
one range per Fn searched (a trial samples in its Fn's). Builtin diffusion transformers, CPU.

The answer is defined on one measurement and tested on another: each range comes from
calibration calls; inertness is then measured on the search's first batch (where the worker's
"inert" early stop looks) and on a batch of other prompts the calibration never saw (what a
served prompt meets). `thresholds` points per Fn, one in the middle of each of as many equal
bins of that Fn's range (the spread TPE's first trials cover, endpoints excluded), at Fn = 1 and
`largest_fn`, Bn=0, the shortest and the longest warm-up searched, `steps` steps, batches of
`batch_size`.

    python -m benchmarks inert-ranges      # three to four minutes on 2 cores
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import machine, table
from optsearch.accelerators import AppliedSetting, CalibratedRange, dbcache, params_of
from optsearch.measure.generation import GenerationConfig, generate
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import builtin_prompts

MODELS = ("builtin:tiny-flux", "builtin:tiny-sd3", "builtin:tiny-qwen-image")


def main(thresholds: int = 8, batch_size: int = 2, steps: int = 12,
         short_warmup: int = 1, long_warmup: int = 4, largest_fn: int = 3) -> None:
    warmups, fns = (short_warmup, long_warmup), (1, largest_fn)
    default = params_of("dbcache")["residual_diff_threshold"].default
    texts = builtin_prompts()
    first, other = texts[:batch_size], texts[batch_size:2 * batch_size]
    config = GenerationConfig(steps=steps, guidance_scale=3.5, batch_size=batch_size)
    rows = []
    for model in MODELS:
        pipe = load_pipeline(model, device="cpu", dtype="float32")

        def calibrated(prompts: list[str], searched: dict, pipe=pipe) -> CalibratedRange:
            measured = dbcache.calibrate(pipe, lambda: list(generate(pipe, prompts, config, warmup=False)),
                                         searched)
            by = measured["by"]["residual_diff_threshold"]
            return CalibratedRange(measured["auto"]["residual_diff_threshold"], tuple(by))

        past_warmup = {"max_warmup_steps": list(warmups)}
        ranges = {"default": CalibratedRange(default),
                  "first prompt, all steps, Fn=1": CalibratedRange(calibrated(first[:1], {})),
                  "first batch, past warm-up, Fn=1": CalibratedRange(calibrated(first, past_warmup)),
                  "first batch, past warm-up, per Fn": calibrated(
                      first, {**past_warmup, "Fn_compute_blocks": list(fns)})}
        for name, calibration in ranges.items():
            inert = {"first": 0, "other": 0}
            fractions, trials = [], 0
            for fn in fns:
                low, high = calibration.for_setting({"Fn_compute_blocks": fn})
                edges = np.linspace(low, high, thresholds + 1)
                for threshold in (edges[:-1] + edges[1:]) / 2:
                    for warmup in warmups:
                        trials += 1
                        setting = {"dbcache": {"residual_diff_threshold": float(threshold),
                                               "Fn_compute_blocks": fn, "max_warmup_steps": warmup}}
                        for batch, prompts in (("first", first), ("other", other)):
                            with AppliedSetting(pipe, setting) as applied:
                                list(generate(pipe, prompts, config, setting=applied, warmup=False))
                                fraction = applied.computed_fraction()
                            inert[batch] += fraction >= 1.0
                            fractions.append(fraction)
            shown = "; ".join(f"Fn={fn} [{lo:.3f}, {hi:.3f}]" for fn in fns
                              for lo, hi in [calibration.for_setting({"Fn_compute_blocks": fn})])
            rows.append([model, name, shown, f"{inert['first']}/{trials}", f"{inert['other']}/{trials}",
                         f"{min(fractions):.2f}-{max(fractions):.2f}"])
    print(machine())
    print(f"{thresholds} thresholds x warm-ups {list(warmups)} x Fn {list(fns)}, batches of "
          f"{batch_size}, {steps} steps")
    print(table(["model", "range from", "threshold range", "inert: first batch",
                 "inert: other prompts", "computed share"], rows))
