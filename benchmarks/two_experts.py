"""What a cache gains on Wan 2.2 A14B's layout when it acts on both experts (as optsearch applies
it since 2026-12-06) rather than on the first only (as before: the low-noise expert, which runs
the steps below the boundary, ran in full).

builtin:tiny-wan22 (tiny Wan with a second transformer below boundary 0.875), 16 steps, 4
prompts in batches of 2, CPU. Each setting: `repeats` A B rounds against the baseline, both
ways; speedup = baseline s/video / setting s/video (median), PSNR per frame against the
baseline's videos (random weights: fidelity, not quality). "First only" is the same setting
applied while the pipeline's `transformer_2` is hidden, so nothing is hooked on it. MagCache and
FasterCache were refused on two experts before, and TaylorSeer on Wan at all: they run on both
only. MagCache gives each expert its own ratios over its own steps (one calibration call before
the rounds), at the paper's default and at the middle of its calibrated threshold range;
FasterCache's second expert computes its first step; TaylorSeer runs in lite mode.

    python -m benchmarks two-experts --repeats 3     # about 2 minutes on 2 cores
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import numpy as np

from benchmarks.common import machine, table
from optsearch.accelerators import AppliedSetting, magcache
from optsearch.measure.generation import GenerationConfig, generate
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import builtin_prompts
from optsearch.measure.quality import psnr

SETTINGS = [
    ("fbcache 0.12 (published)", {"fbcache": {"threshold": 0.12}}),
    ("pab 2, (100, 800) (published)", {"pab": {"spatial_attention_block_skip_range": 2}}),
    ("seacache 1.0, 4 in a row", {"seacache": {"threshold": 1.0, "max_consecutive_cached": 4}}),
    ("dbcache F1B0 0.12", {"dbcache": {"residual_diff_threshold": 0.12, "max_warmup_steps": 2}}),
    ("magcache 0.06/3/0.2 (published)", {"magcache": {"threshold": 0.06, "max_skip_steps": 3,
                                                      "retention_ratio": 0.2}}),
    ("magcache mid-range/3/0.2", {"magcache": {"max_skip_steps": 3, "retention_ratio": 0.2}}),
    ("fastercache 2, below 681 (published)", {"fastercache": {"spatial_attention_block_skip_range": 2,
                                                              "timestep_skip_high": 681}}),
    ("fastercache 3, below 1000", {"fastercache": {"spatial_attention_block_skip_range": 3,
                                                   "timestep_skip_high": 1000}}),
    ("taylorseer lite 5/3/1 (diffusers' defaults)", {"taylorseer": {"use_lite_mode": True}}),
]
REFUSED_BEFORE = ("magcache", "fastercache", "taylorseer")  # on two experts (or on Wan at all)


@contextmanager
def applied(pipe, setting: dict, both: bool, calibration: dict):
    """The setting applied to both experts, or to the first only (transformer_2 hidden while
    the caches hook the pipeline, back before it runs)."""
    second = pipe.transformer_2
    if not both:
        pipe.transformer_2 = None
    try:
        patch = AppliedSetting(pipe, setting, calibration)
    finally:
        pipe.transformer_2 = second
    try:
        yield patch
    finally:
        patch.restore()


def main(repeats: int = 3) -> None:
    started = time.perf_counter()
    pipe = load_pipeline("builtin:tiny-wan22", device="cpu", dtype="float32")
    config = GenerationConfig(steps=16, guidance_scale=5.0, batch_size=2, num_frames=9)
    prompts = builtin_prompts()[:4]

    def run(call=None):
        batches = list(generate(pipe, prompts, config, setting=call))
        return np.concatenate([b.images for b in batches]), sum(b.seconds for b in batches)

    reference, _ = run()
    calibration = {"magcache": magcache.measure(pipe, config.steps, lambda: list(  # one call
        generate(pipe, prompts[:2], config, warmup=False)))}
    middle = magcache.range_for(calibration["magcache"], {"max_skip_steps": 3, "retention_ratio": 0.2},
                                config.steps)
    print(f"  magcache: threshold range {middle} at 3 skips, retention 0.2", flush=True)
    rows = []
    for name, setting in SETTINGS:
        if name.startswith("magcache mid-range"):
            setting = {"magcache": {**setting["magcache"], "threshold": round(sum(middle) / 2, 4)}}
            name = name.replace("mid-range", f"{setting['magcache']['threshold']}")
        row = [name]
        for both in (False, True):
            if not both and set(setting) & set(REFUSED_BEFORE):
                row += ["refused before", "-"]
                continue
            ratios, videos = [], None
            for _ in range(repeats):
                _, base_seconds = run()
                with applied(pipe, setting, both, calibration) as patch:
                    videos, seconds = run(patch)
                ratios.append(base_seconds / seconds)
            fidelity = float(np.mean([psnr(a, b) for a, b in zip(
                reference.reshape(-1, *reference.shape[-3:]), videos.reshape(-1, *videos.shape[-3:]),
                strict=True)]))
            row += [f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]",
                    f"{fidelity:.1f}"]
        rows.append(row)
        print(f"  {name}: first only {row[1]} {row[2]} dB, both {row[3]} {row[4]} dB", flush=True)
    print(f"\n# builtin:tiny-wan22, 16 steps, 4 prompts, batch 2, {repeats} A/B rounds ({machine()})")
    print(table(["setting", "first expert only: speedup", "PSNR (dB)", "both experts: speedup",
                 "PSNR (dB)"], rows))
    print(f"{time.perf_counter() - started:.0f} s in all")
