"""(gpu) A full-width Wan 2.1 1.3B video transformer (random weights) at the real frame count,
with the video caches: PAB, FasterCache, FirstBlockCache, MagCache and cache-dit's DBCache.

Wan 2.1 1.3B's width (12 heads of 128 = 1536, FFN 8960, UMT5 text width 4096) at reduced depth:
`DEPTH` blocks instead of 30 (a step's cost is nearly linear in the blocks, so the full model
costs about 30 / DEPTH times these; the caches skip or reuse whole blocks or attention layers in
proportion). 81 frames of 832x480 (21 latent frames of 60x104, 32,760 tokens), 50 steps,
guidance 5.0 (two transformer calls a step), bf16, batch 1; prompt embeddings are random (no
text encoder or VAE: latents out), which changes nothing about the transformer's cost.

    python -m benchmarks gpu-wan      # needs CUDA; prints a Markdown table
"""

from __future__ import annotations

import sys
import time

import torch

from benchmarks.common import machine, table, time_cache_settings

DEPTH, STEPS, FRAMES, HEIGHT, WIDTH = 4, 50, 81, 480, 832
SETTINGS = [
    ("baseline", {}),
    ("steps 25 (of 50)", {"steps": {"num_inference_steps": 25}}),
    ("pab 2, (100, 800)", {"pab": {"spatial_attention_block_skip_range": 2}}),
    ("fastercache 2, below 681", {"fastercache": {"spatial_attention_block_skip_range": 2,
                                                  "timestep_skip_high": 681}}),
    ("fbcache 0.12", {"fbcache": {"threshold": 0.12}}),
    ("magcache 0.06/3/0.2", {"magcache": {}}),
    ("dbcache F1B0 0.08 (cache-dit default)", {"dbcache": {"residual_diff_threshold": 0.08}}),
    # random weights: residual differences sit far above real-model thresholds; the calibrated
    # range's top (filled in by main) is what "skips nearly everything" costs
    ("dbcache F1B0 at the calibrated max", {"dbcache": {}}),
]


def build():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=DEPTH,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    ).to("cuda", torch.bfloat16)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=None,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_wan.py needs a CUDA GPU")
    started = time.perf_counter()
    pipe = build()
    embeds = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    negative = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)

    def call(target, steps=STEPS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        target(prompt_embeds=embeds, negative_prompt_embeds=negative, height=HEIGHT, width=WIDTH,
               num_frames=FRAMES, num_inference_steps=steps, guidance_scale=5.0,
               output_type="latent", generator=torch.Generator("cuda").manual_seed(0))
        torch.cuda.synchronize()
        return time.perf_counter() - start

    call(pipe, 2)
    timed = time_cache_settings(pipe, call, SETTINGS, STEPS)
    baseline = timed[0][1]
    rows = [[name, seconds, seconds / FRAMES, baseline / seconds, computed]
            for name, seconds, computed in timed]
    print(f"\n# GPU, Wan 2.1 1.3B width, {DEPTH} of 30 blocks (~{30 / DEPTH:.0f}x the cost in "
          f"full), {FRAMES} frames of {WIDTH}x{HEIGHT}, {STEPS} steps, CFG 5.0, bf16, batch 1, "
          f"transformer only ({machine()})")
    print(table(["setting", "s/video", "s/frame", "speedup", "computed"], rows))
    print(f"total {time.perf_counter() - started:.0f} s")
