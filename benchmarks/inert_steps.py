"""How many steps + DBCache trials skip nothing (are inert) at step counts between the fewest
searched and the model's: with the threshold range calibrated at the model's steps only (optsearch
before 2026-12-05), and as the worker now does it (calibrated at both ends, a trial's range
blended at its step count). Builtin diffusion transformers, CPU.

The answer is defined on one measurement and tested on another: the ranges come from calibration
calls at `fewest` and `steps` steps; inertness is measured by running trials at the step counts
in between (`between`), which no calibration ran: `thresholds` points per Fn, one in the middle of
each of as many equal bins of the range that trial would sample in (endpoints excluded), at
Fn = 1 and `largest_fn`, Bn = 0, warm-up `warmup`, on the search's first batch (where the worker's
"inert" early stop looks).

    python -m benchmarks inert-steps      # about two minutes on 2 cores

With `--masks fast,ultra`, the trials run cache-dit's dynamic steps masks (SCM): only the steps
a mask leaves out can skip, so a trial's range should start at the least difference on those. The
rows compare the per-Fn blend of the two calibrated ranges (before) with the mask-aware range read
step by step from the two calibrated runs (`dbcache.range_for`, now).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np

from benchmarks.common import machine, table
from optsearch.accelerators import AppliedSetting, CalibratedRange, calibrate_family, dbcache
from optsearch.measure.generation import GenerationConfig, generate
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import builtin_prompts

MODELS = ("builtin:tiny-flux", "builtin:tiny-sd3", "builtin:tiny-qwen-image")


def main(thresholds: int = 6, batch_size: int = 2, steps: int = 20, fewest: int = 6,
         between: str = "8,10,13,16", warmup: int = 1, largest_fn: int = 3, masks: str = "") -> None:
    counts = [int(count) for count in between.split(",")]
    fns = (1, largest_fn)
    first = builtin_prompts()[:batch_size]
    config = GenerationConfig(steps=steps, guidance_scale=3.5, batch_size=batch_size)
    searched = {"max_warmup_steps": [warmup], "Fn_compute_blocks": list(fns)}
    rows = []
    for model in MODELS:
        pipe = load_pipeline(model, device="cpu", dtype="float32")

        def run_once(count: int, pipe=pipe) -> None:
            list(generate(pipe, first, dataclasses.replace(config, steps=count), warmup=False))

        measured = calibrate_family("dbcache", pipe, run_once, searched, [steps, fewest])
        calibrated = CalibratedRange.stored(measured, "residual_diff_threshold")
        if masks:
            ways = [(f"{mask}, {way}", mask, rule) for way, rule in (
                ("per-Fn blend", calibrated.for_setting),
                ("mask-aware", partial(dbcache.range_for, measured))) for mask in masks.split(",")]
        else:
            ways = [("model's steps only", "none",
                     lambda values, _count, at=calibrated: at.for_setting(values)),
                    (f"{fewest} and {steps} steps, blended", "none", calibrated.for_setting)]
        for name, mask, range_of in ways:
            inert, trials, per_count = 0, 0, {}
            for count in counts:
                at_count = dataclasses.replace(config, steps=count)
                for fn in fns:
                    values = {"Fn_compute_blocks": fn, "max_warmup_steps": warmup}
                    if mask != "none":
                        values |= {"steps_computation_mask": mask, "steps_computation_policy": "dynamic"}
                    low, high = range_of(values, count)
                    edges = np.linspace(low, high, thresholds + 1)
                    for threshold in (edges[:-1] + edges[1:]) / 2:
                        setting = {"dbcache": {**values, "residual_diff_threshold": float(threshold)}}
                        with AppliedSetting(pipe, setting) as applied:
                            list(generate(pipe, first, at_count, setting=applied, warmup=False))
                            skipped_nothing = applied.computed_fraction() >= 1.0
                        trials += 1
                        inert += skipped_nothing
                        per_count[count] = per_count.get(count, 0) + skipped_nothing
            rows.append([model, name, f"{inert}/{trials}",
                         ", ".join(f"{count}: {n}" for count, n in per_count.items())])
            print(rows[-1], flush=True)
    print(machine())
    print(f"model steps {steps}, fewest searched {fewest}; trials at {counts} steps; {thresholds} "
          f"thresholds x Fn {list(fns)}, warm-up {warmup}, first batch of {batch_size}")
    print(table(["model", "range calibrated at", "inert", f"inert per step count (of {2 * thresholds})"],
                rows))
