"""(gpu) A full-width Wan 2.1 1.3B video transformer (random weights) at the real frame count,
with the video caches: PAB, FasterCache, FirstBlockCache, MagCache and cache-dit's DBCache.

Wan 2.1 1.3B's width (12 heads of 128 = 1536, FFN 8960, UMT5 text width 4096) at reduced depth:
`DEPTH` blocks instead of 30 (a step's cost is nearly linear in the blocks, so the full model
costs about 30 / DEPTH times these; the caches skip or reuse whole blocks or attention layers in
proportion). 81 frames of 832x480 (21 latent frames of 60x104, 32,760 tokens), 50 steps,
guidance 5.0 (two transformer calls a step), bf16, batch 1; prompt embeddings are random (no
text encoder or VAE: latents out), which changes nothing about the transformer's cost.

    python -m benchmarks gpu-wan           # needs CUDA; prints a Markdown table
    python -m benchmarks gpu-wan --smoke   # the same code on the CPU at a tiny size (the suite runs it)
    python -m benchmarks gpu-wan --budget-s 100   # no setting starts after 100 s (the check)
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import (
    at_steps,
    cast_as_loaded,
    machine,
    size_for,
    synchronize,
    table,
    time_cache_settings,
)

DEPTH = 4
# Wan 2.1 1.3B's width at the real frame count; --smoke: the same code at a size the CPU runs
FULL = dict(device="cuda", dtype=torch.bfloat16, steps=50, frames=81, height=480, width=832,
            heads=12, head_dim=128, text_dim=4096, ffn_dim=8960, freq_dim=256)
SMOKE = dict(device="cpu", dtype=torch.float32, steps=4, frames=9, height=64, width=64,
             heads=2, head_dim=16, text_dim=32, ffn_dim=64, freq_dim=64)
SETTINGS = [
    ("baseline", {}),
    ("steps 25 (of 50)", {"steps": {"num_inference_steps": 25}}),
    ("pab 2, (100, 800)", {"pab": {"spatial_attention_block_skip_range": 2}}),
    ("fastercache 2, below 681", {"fastercache": {"spatial_attention_block_skip_range": 2,
                                                  "timestep_skip_high": 681}}),
    ("fbcache 0.12", {"fbcache": {"threshold": 0.12}}),
    ("taylorseer lite 5/3/1", {"taylorseer": {"cache_interval": 5, "disable_cache_before_step": 3,
                                              "use_lite_mode": True}}),
    ("magcache 0.06/3/0.2", {"magcache": {}}),
    ("seacache 0.25/1/2 (diffusers' default)", {"seacache": {}}),
    ("dbcache F1B0 0.08 (cache-dit default)", {"dbcache": {"residual_diff_threshold": 0.08}}),
    # random weights: residual differences sit far above real-model thresholds; the calibrated
    # range's top (filled in by main) is what "skips nearly everything" costs
    ("dbcache F1B0 at the calibrated max", {"dbcache": {}}),
]


def build(size: dict = FULL):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(size["device"]):  # random init where it runs: seconds, not a minute
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=size["heads"], attention_head_dim=size["head_dim"],
            in_channels=16, out_channels=16, text_dim=size["text_dim"], freq_dim=size["freq_dim"],
            ffn_dim=size["ffn_dim"], num_layers=DEPTH, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6,
        )
    cast_as_loaded(transformer, size["device"], size["dtype"])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(smoke: bool = False, budget_s: float = 0.0) -> None:
    size = size_for("gpu_wan.py", smoke, FULL, SMOKE)
    started = time.perf_counter()
    deadline = started + budget_s if budget_s else None  # no setting starts after it
    pipe = build(size)
    device, dtype, steps, frames = size["device"], size["dtype"], size["steps"], size["frames"]
    embeds = torch.randn(1, 512, size["text_dim"], device=device, dtype=dtype)
    negative = torch.randn(1, 512, size["text_dim"], device=device, dtype=dtype)

    def call(target, steps=steps):
        synchronize()
        start = time.perf_counter()
        target(prompt_embeds=embeds, negative_prompt_embeds=negative, height=size["height"],
               width=size["width"], num_frames=frames, num_inference_steps=steps,
               guidance_scale=5.0, output_type="latent",
               generator=torch.Generator(device).manual_seed(0))
        synchronize()
        return time.perf_counter() - start

    call(pipe, 2)
    timed = time_cache_settings(pipe, call, at_steps(SETTINGS, steps),
                                steps, deadline=deadline)
    baseline = timed[0][1]
    rows = [[name, seconds, seconds / frames, baseline / seconds, computed,
             "-" if peak is None else peak] for name, seconds, computed, peak in timed]
    print(f"\n# {'SMOKE (CPU, tiny: not a measurement)' if smoke else 'GPU'}, Wan 2.1 1.3B "
          f"width, {DEPTH} of 30 blocks (~{30 / DEPTH:.0f}x the cost in full), {frames} frames of "
          f"{size['width']}x{size['height']}, {steps} steps, CFG 5.0, "
          f"{str(dtype).removeprefix('torch.')}, batch 1, transformer only ({machine()})")
    print(table(["setting", "s/video", "s/frame", "speedup", "computed", "peak GiB"], rows))
    print(f"total {time.perf_counter() - started:.0f} s")
