"""Speedup and fidelity of every accelerator family, on builtin:tiny-flux (FLUX's
topology, 128 px, 20 steps), builtin:tiny-flux2 and -klein (FLUX.2 [dev]'s and [klein]'s
pipelines, the same sizes; every family but fbcache, which FLUX.2 refuses), builtin:tiny-sd3 and
builtin:tiny-qwen-image (cache-dit's DBCache against fewer steps, 128 px, 20 steps),
builtin:tiny-z-image (the same at Z-Image-Turbo's 9 steps),
builtin:tiny-wan (the video caches against fewer steps, 9 frames of 64 px, 16 steps; PSNR per
frame, averaged) and builtin:cpu-bench (SD 1.5's topology, 256 px, 25 steps), CPU.

Each setting: the short warm-up, then `repeats` timed passes over 4 prompts (batch 2), A/B
interleaved with the baseline; speedup = baseline s/image / setting s/image (median of the
passes); PSNR of the setting's images against the baseline's (random weights: fidelity, not
quality). The published operating points are those of warm_start.PUBLISHED; their published
speedups are for real weights on GPUs (sources in RESULTS.md).

    python -m benchmarks families --repeats 3     # about 6 minutes on 2 cores with 3 repeats
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from benchmarks.common import machine, table
from optsearch.accelerators import AppliedSetting, magcache
from optsearch.measure.generation import GenerationConfig, generate
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import builtin_prompts
from optsearch.measure.quality import psnr

FLUX = [
    ("steps 10 (of 20)", {"steps": {"num_inference_steps": 10}}),
    ("steps 14", {"steps": {"num_inference_steps": 14}}),
    ("fbcache 0.12 (published)", {"fbcache": {"threshold": 0.12}}),
    ("fbcache 0.5", {"fbcache": {"threshold": 0.5}}),
    ("taylorseer 5/3/1 (published)", {"taylorseer": {"cache_interval": 5,
                                                     "disable_cache_before_step": 3}}),
    ("taylorseer 3/2/2", {"taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2,
                                         "max_order": 2}}),
    ("pab 2, (100, 800) (published)", {"pab": {"spatial_attention_block_skip_range": 2}}),
    ("pab 3, (100, 1000)", {"pab": {"spatial_attention_block_skip_range": 3,
                                    "timestep_skip_high": 1000}}),
    ("magcache 0.06/3/0.2 (published)", {"magcache": {}}),
    ("magcache 0.3/4/0.1", {"magcache": {"threshold": 0.3, "max_skip_steps": 4,
                                         "retention_ratio": 0.1}}),
    ("steps 14 + taylorseer 3/2", {"steps": {"num_inference_steps": 14},
                                   "taylorseer": {"cache_interval": 3,
                                                  "disable_cache_before_step": 2}}),
    ("dbcache F1B0 0.08 (published)", {"dbcache": {"residual_diff_threshold": 0.08,
                                                   "max_warmup_steps": 8}}),
    ("dbcache F1B0 0.5", {"dbcache": {"residual_diff_threshold": 0.5, "max_warmup_steps": 4}}),
    ("dbcache F1B0 0.5 + TaylorSeer 1", {"dbcache": {"residual_diff_threshold": 0.5,
                                                     "max_warmup_steps": 4, "taylorseer_order": 1}}),
]
FLUX2 = [setting for setting in FLUX if "fbcache" not in setting[1]] + [  # refused on FLUX.2
    ("dbcache F1B0 0.9", {"dbcache": {"residual_diff_threshold": 0.9, "max_warmup_steps": 4}}),
]
DIT = [  # tiny-sd3 and tiny-qwen-image: what cache-dit applies to both, against fewer steps
    ("steps 10 (of 20)", {"steps": {"num_inference_steps": 10}}),
    ("steps 14", {"steps": {"num_inference_steps": 14}}),
    ("dbcache F1B0 0.08 (published)", {"dbcache": {"residual_diff_threshold": 0.08,
                                                   "max_warmup_steps": 8}}),
    ("dbcache F1B0 0.6", {"dbcache": {"residual_diff_threshold": 0.6, "max_warmup_steps": 4}}),
    ("dbcache F1B1 0.6 + TaylorSeer 1", {"dbcache": {"residual_diff_threshold": 0.6,
                                                     "Bn_compute_blocks": 1, "max_warmup_steps": 4,
                                                     "taylorseer_order": 1}}),
]
Z_IMAGE = [  # tiny-z-image at Z-Image-Turbo's 9 steps: what applies (no diffusers cache hooks)
    ("steps 5 (of 9)", {"steps": {"num_inference_steps": 5}}),
    ("steps 7", {"steps": {"num_inference_steps": 7}}),
    ("dbcache F1B0 0.08, warm-up 2", {"dbcache": {"residual_diff_threshold": 0.08,
                                                  "max_warmup_steps": 2}}),
    ("dbcache F1B0 0.6, warm-up 2", {"dbcache": {"residual_diff_threshold": 0.6, "max_warmup_steps": 2}}),
    ("dbcache F1B0 1.0, warm-up 2", {"dbcache": {"residual_diff_threshold": 1.0, "max_warmup_steps": 2}}),
    ("dbcache F1B0 1.0 + TaylorSeer 1", {"dbcache": {"residual_diff_threshold": 1.0,
                                                     "max_warmup_steps": 2, "taylorseer_order": 1}}),
]
VIDEO = [  # tiny-wan: the caches made for video, against fewer steps
    ("steps 8 (of 16)", {"steps": {"num_inference_steps": 8}}),
    ("steps 12", {"steps": {"num_inference_steps": 12}}),
    ("pab 2, (100, 800) (published)", {"pab": {"spatial_attention_block_skip_range": 2}}),
    ("fastercache 2, below 681 (published)", {"fastercache": {"spatial_attention_block_skip_range": 2,
                                                              "timestep_skip_high": 681}}),
    ("fastercache 4, below 1000", {"fastercache": {"spatial_attention_block_skip_range": 4,
                                                   "timestep_skip_high": 1000}}),
    ("fbcache 0.12 (published)", {"fbcache": {"threshold": 0.12}}),
    ("magcache 0.06/3/0.2 (published)", {"magcache": {}}),
    ("dbcache F1B0 0.08 (published)", {"dbcache": {"residual_diff_threshold": 0.08,
                                                   "max_warmup_steps": 8}}),
    ("dbcache F1B0 0.12", {"dbcache": {"residual_diff_threshold": 0.12, "max_warmup_steps": 2}}),
    ("seacache 0.25/1/2 (diffusers' default)", {"seacache": {}}),
    ("seacache 1.0, 4 in a row", {"seacache": {"threshold": 1.0, "max_consecutive_cached": 4}}),
]
UNET = [
    ("steps 12 (of 25)", {"steps": {"num_inference_steps": 12}}),
    ("steps 18", {"steps": {"num_inference_steps": 18}}),
    ("deepcache 3/0 (published)", {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}),
    ("pab 2, (100, 800)", {"pab": {"spatial_attention_block_skip_range": 2}}),
    ("pab 4, (100, 1000)", {"pab": {"spatial_attention_block_skip_range": 4,
                                    "timestep_skip_high": 1000}}),
    ("steps 18 + deepcache 3/0", {"steps": {"num_inference_steps": 18},
                                  "deepcache": {"cache_interval": 3, "cache_branch_id": 0}}),
]


def measure(pipe, config, prompts, settings, repeats: int) -> list[list]:
    def run(setting=None):
        batches = list(generate(pipe, prompts, config, setting=setting))
        return np.concatenate([b.images for b in batches]), sum(b.seconds for b in batches)

    reference, _ = run()
    calibration = {"magcache": magcache.measure(pipe, config.steps, lambda: run())} \
        if any("magcache" in s for _, s in settings) else {}
    rows = []
    for name, setting in settings:
        ratios, images = [], None
        for _ in range(repeats):  # A B A B: the machine's drift hits both sides alike
            _, base_seconds = run()
            with AppliedSetting(pipe, setting, calibration) as applied:
                images, seconds = run(applied)
            ratios.append(base_seconds / seconds)
        fidelity = float(np.mean([psnr(a, b) for a, b in zip(  # videos: per frame
            reference.reshape(-1, *reference.shape[-3:]), images.reshape(-1, *images.shape[-3:]),
            strict=True)]))
        rows.append([name, statistics.median(ratios), min(ratios), max(ratios), fidelity])
        print(f"  {name}: {statistics.median(ratios):.2f}x, {fidelity:.1f} dB", flush=True)
    return rows


def main(repeats: int = 3, only: str = "") -> None:
    """`only`: a model name (e.g. builtin:tiny-wan) to measure that one alone."""
    started = time.perf_counter()
    prompts = builtin_prompts()[:4]
    headers = ["setting", "speedup (median)", "min", "max", "PSNR vs baseline (dB)"]
    for model, steps, settings in (("builtin:tiny-flux", 20, FLUX), ("builtin:tiny-flux2", 20, FLUX2),
                                   ("builtin:tiny-flux2-klein", 20, FLUX2),
                                   ("builtin:tiny-sd3", 20, DIT),
                                   ("builtin:tiny-qwen-image", 20, DIT),
                                   ("builtin:tiny-z-image", 9, Z_IMAGE),
                                   ("builtin:tiny-wan", 16, VIDEO),
                                   ("builtin:cpu-bench", 25, UNET)):
        if only and model != only:
            continue
        pipe = load_pipeline(model, device="cpu", dtype="float32")
        guidance = {"builtin:cpu-bench": 7.5, "builtin:tiny-wan": 5.0,
                    "builtin:tiny-flux2": 4.0, "builtin:tiny-flux2-klein": 4.0,
                    "builtin:tiny-z-image": 0.0}.get(model, 3.5)
        config = GenerationConfig(steps=steps, guidance_scale=guidance, batch_size=2)
        print(f"{model}:", flush=True)
        rows = measure(pipe, config, prompts, settings, repeats)
        print(f"\n# {model}, {steps} steps, 4 prompts, batch 2, {repeats} A/B rounds ({machine()})")
        print(table(headers, rows), flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")

