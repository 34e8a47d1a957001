"""How many DBCache trials skip nothing (are inert) with the default threshold range, and with the
range calibrated on the device ("auto"), on the builtin diffusion transformers, CPU.

The answer is defined on one measurement and tested on another: the auto range comes from one
calibration call on the first builtin prompt (`dbcache.calibrate`, as the worker does); inertness
is then measured on `prompts` other prompts (a batch per threshold: compute_fraction 1.0 means
nothing was skipped, the trial the worker stops as "inert"). `thresholds` evenly spaced points of
each range (the spread TPE's first trials cover), Fn=1, Bn=0, 2 warm-up steps, `steps` steps.

    python -m benchmarks inert-ranges      # about a minute on 2 cores
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import machine, table
from optsearch.accelerators import AppliedSetting, dbcache, params_of
from optsearch.measure.generation import GenerationConfig, generate
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import builtin_prompts

MODELS = ("builtin:tiny-flux", "builtin:tiny-sd3", "builtin:tiny-qwen-image")


def main(thresholds: int = 8, prompts: int = 2, steps: int = 12) -> None:
    default = params_of("dbcache")["residual_diff_threshold"].default
    texts = builtin_prompts()
    config = GenerationConfig(steps=steps, guidance_scale=3.5, batch_size=prompts)
    rows = []
    for model in MODELS:
        pipe = load_pipeline(model, device="cpu", dtype="float32")
        measured = dbcache.calibrate(pipe, lambda pipe=pipe: list(generate(
            pipe, texts[:1], config, warmup=False)))
        auto = measured["auto"]["residual_diff_threshold"]
        for name, (low, high) in (("default", default), ("auto", auto)):
            fractions = []
            for threshold in np.linspace(low, high, thresholds):
                setting = {"dbcache": {"residual_diff_threshold": float(threshold),
                                       "max_warmup_steps": 2}}
                with AppliedSetting(pipe, setting) as applied:
                    list(generate(pipe, texts[1:1 + prompts], config, setting=applied,
                                  warmup=False))
                    fractions.append(applied.computed_fraction())
            inert = sum(f >= 1.0 for f in fractions)
            rows.append([model, name, f"[{low:.3f}, {high:.3f}]", f"{inert}/{len(fractions)}",
                         f"{min(fractions):.2f}-{max(fractions):.2f}"])
    print(machine())
    print(table(["model", "range", "threshold range", "inert trials", "computed share"], rows))
