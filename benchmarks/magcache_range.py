"""How many MagCache trials measure nothing new: inert (skip no step) or a repeat of the saturated
computation (every threshold past the point where `max_skip_steps`, `retention_ratio` and the step
count allow no more skips makes the same images), with the spec range the shipped specs had
([0.02, 0.3]), the family's default ([0.02, 0.5]) and "auto" (each trial's own range, from the
ratios; optsearch since 2026-12-05).

The answer is defined on one measurement and tested on another: ratios and ranges come from one
plain call on the first prompts; each trial then runs for real on other prompts, beside the same
setting at a threshold of 10 (its saturated run), and "repeat" means their images are equal,
"inert" that the call computed every step. Builtin DiTs on the CPU; then diffusers' published
FLUX.1-dev ratios (real weights' ratios), where only the replay can run here (`skipped_steps`,
tested equal to real calls).

    python -m benchmarks magcache-range      # about a minute on 2 cores
"""

from __future__ import annotations

import dataclasses

import numpy as np

from benchmarks.common import machine, table
from optsearch.accelerators import AppliedSetting, magcache
from optsearch.measure.generation import GenerationConfig, generate
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import builtin_prompts

MODELS = ("builtin:tiny-flux", "builtin:tiny-qwen-image", "builtin:tiny-wan")
RANGES = {"spec [0.02, 0.3] (before)": (0.02, 0.3), "default [0.02, 0.5]": (0.02, 0.5), "auto (now)": None}


def _draws(rng, count: int, fewest: int, steps: int) -> list[tuple[int, int, float, float]]:
    """(step count, max_skip_steps, retention_ratio, share of the range) as the shipped specs
    search them: steps [fewest, steps], max_skip_steps [1, 5], retention_ratio [0.1, 0.4]."""
    return [(int(rng.integers(fewest, steps + 1)), int(rng.integers(1, 6)),
             float(rng.uniform(0.1, 0.4)), float(rng.uniform())) for _ in range(count)]


def _threshold(ratios, draw, bounds) -> float:
    steps, skips, retention, share = draw
    low, high = bounds or magcache.threshold_bounds(ratios, steps, skips, retention)
    return low + share * (high - low)


def main(trials: int = 24, steps: int = 20, fewest: int = 8, replays: int = 4000, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    prompts = builtin_prompts()
    calibrate_on, run_on = prompts[:2], prompts[2:3]
    rows = []
    for model in MODELS:
        pipe = load_pipeline(model, device="cpu", dtype="float32")
        config = GenerationConfig(steps=steps, guidance_scale=5.0 if "wan" in model else 3.5,
                                  batch_size=2)
        ratios = magcache.measure(pipe, steps, lambda pipe=pipe, config=config: list(
            generate(pipe, calibrate_on, config, warmup=False)))["mag_ratios"]

        def run(draw, threshold: float, pipe=pipe, config=config, ratios=ratios):
            count, skips, retention, _ = draw
            setting = {"magcache": {"threshold": threshold, "max_skip_steps": skips,
                                    "retention_ratio": retention}}
            with AppliedSetting(pipe, setting, {"magcache": {"mag_ratios": ratios}}) as applied:
                [batch] = list(generate(pipe, run_on, dataclasses.replace(config, steps=count),
                                        setting=applied, warmup=False))
                return applied.computed_fraction(), batch.images

        draws = _draws(rng, trials, fewest, steps)
        saturated = [run(draw, 10.0)[1] for draw in draws]
        for name, bounds in RANGES.items():
            inert = repeats = 0
            for draw, top in zip(draws, saturated, strict=True):
                fraction, images = run(draw, _threshold(ratios, draw, bounds))
                inert += fraction >= 1.0
                repeats += bool(np.array_equal(images, top))
            rows.append([model, name, f"{inert}/{trials}", f"{repeats}/{trials}", "real calls"])
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    flux = [float(r) for r in FLUX_MAG_RATIOS]
    draws = _draws(rng, replays, 10, len(flux))
    for name, bounds in RANGES.items():
        inert = repeats = cut = 0
        for draw in draws:
            count, skips, retention, _ = draw
            low, high = magcache.threshold_bounds(flux, count, skips, retention)
            threshold = _threshold(flux, draw, bounds)
            inert += threshold < low
            repeats += threshold >= high
            cut += bounds is not None and high > bounds[1]
        rows.append(["FLUX.1-dev (diffusers' ratios)", name, f"{inert}/{replays}", f"{repeats}/{replays}",
                     f"replayed; range cut below its top: {cut}/{replays}" if bounds else "replayed"])
    distinct, seen = [], []  # magcache alone ("any") runs the model's steps: 60 draws there
    for draw in _draws(rng, 60, len(flux), len(flux)):  # one range's computations; repeats
        count, skips, retention, _ = draw
        low, high = magcache.threshold_bounds(flux, count, skips, retention)
        distinct.append(len({tuple(magcache.skipped_steps(flux, count, t, skips, retention)[0])
                             for t in np.linspace(low, high, 400)}))
        skipped, _ = magcache.skipped_steps(flux, count, _threshold(flux, draw, None), skips, retention)
        seen.append((count, tuple(skipped)))
    print(machine())
    print(f"tiny models: model steps {steps}, trials at {fewest}-{steps} steps, max_skip_steps 1-5, "
          f"retention 0.1-0.4, {trials} draws each; FLUX.1-dev: its 28 steps, trials at 10-28")
    print(table(["model", "threshold range", "inert", "saturated repeat", "how"], rows))
    print(f"FLUX.1-dev, auto: distinct computations in one trial's range (400 thresholds): median "
          f"{np.median(distinct):.1f}, {min(distinct)}-{max(distinct)}; of 60 trials drawn at random "
          f"at 28 steps, {60 - len(set(seen))} repeat an earlier one's steps and skips (copied, not run)")
