"""TaylorSeer in full mode (diffusers' default: every attention module's output forecast) against
its lite mode (`use_lite_mode`: whole blocks skipped, only the output projection forecast), at
the same schedules, on builtin:tiny-flux (128 px, 20 steps) and builtin:tiny-wan (9 frames of
64 px, 16 steps; full mode hooks nothing there, so only lite is timed), CPU.

Each setting: the short warm-up, then `repeats` timed passes over 4 prompts (batch 2), A/B
interleaved with the baseline; speedup = baseline s/image / setting s/image (median of the
passes); PSNR against the baseline's images (random weights: fidelity, not quality). "factors"
is the most the cache holds in a call at the setting's order and mode (`taylorseer.
peak_factor_bytes`, as `optsearch check` measures it: one more call, batch 2, untimed): the bytes
of every hooked module's Taylor factors, summed over guidance contexts: the memory TaylorSeer adds.

    python -m benchmarks taylorseer-lite --repeats 3     # about 3 minutes on 2 cores
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import numpy as np

from benchmarks.common import ab_rounds, machine, table
from optsearch.accelerators import taylorseer
from optsearch.measure.generation import GenerationConfig, generate
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import builtin_prompts
from optsearch.measure.quality import psnr

SCHEDULES = [("5/3/1 (diffusers' defaults)", {"cache_interval": 5, "disable_cache_before_step": 3}),
             ("3/2/1", {"cache_interval": 3, "disable_cache_before_step": 2}),
             ("3/2/2", {"cache_interval": 3, "disable_cache_before_step": 2, "max_order": 2})]
MODELS = [("builtin:tiny-flux", 20, 3.5, (False, True)), ("builtin:tiny-wan", 16, 5.0, (True,))]


def main(repeats: int = 3) -> None:
    started = time.perf_counter()
    prompts = builtin_prompts()[:4]
    for model, steps, guidance, modes in MODELS:
        pipe = load_pipeline(model, device="cpu", dtype="float32")
        config = GenerationConfig(steps=steps, guidance_scale=guidance, batch_size=2)

        def run(setting=None, config=config, pipe=pipe):
            batches = list(generate(pipe, prompts, config, setting=setting))
            return np.concatenate([b.images for b in batches]), sum(b.seconds for b in batches)

        reference, _ = run()
        rows = []
        print(f"{model}:", flush=True)
        for label, schedule in SCHEDULES:
            for lite in modes:
                setting = {"taylorseer": {**schedule, "use_lite_mode": lite}}
                ratios, images, computed = ab_rounds(pipe, run, setting, repeats)
                held = taylorseer.peak_factor_bytes(pipe, lambda count, config=config, pipe=pipe: list(
                    generate(pipe, prompts[:2], replace(config, steps=count), warmup=False)),
                    schedule.get("max_order", 1), lite)
                fidelity = float(np.mean([psnr(a, b) for a, b in zip(  # videos: per frame
                    reference.reshape(-1, *reference.shape[-3:]),
                    images.reshape(-1, *images.shape[-3:]), strict=True)]))
                name = f"{'lite' if lite else 'full'} {label}"
                rows.append([name, statistics.median(ratios), min(ratios), max(ratios), fidelity,
                             f"{computed:.0%}", f"{held / 2**10:.1f}"])
                print(f"  {name}: {statistics.median(ratios):.2f}x, {fidelity:.1f} dB, "
                      f"{held / 2**10:.1f} KiB", flush=True)
        print(f"\n# {model}, {steps} steps, 4 prompts, batch 2, {repeats} A/B rounds ({machine()})")
        print(table(["setting", "speedup (median)", "min", "max", "PSNR vs baseline (dB)",
                     "computed", "factors KiB"], rows), flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
