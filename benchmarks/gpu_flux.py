"""(gpu) A full-width FLUX transformer (random weights) with diffusers' caches and cache-dit's DBCache.

FLUX.1's width (24 heads of 128 = 3072, joint attention 4096, 64 latent channels) at reduced
depth: `DEPTH_DOUBLE` double-stream and `DEPTH_SINGLE` single-stream blocks instead of 19 and 38
(the full model in bf16 is 24 GB of weights, too long to build with random init in a short device
call). A step's cost is nearly linear in the number of blocks, so the full model's seconds per
image are about (19 + 38 * 0.5) / (DEPTH_DOUBLE + DEPTH_SINGLE * 0.5) times these (a single block
costs about half a double one); the caches' speedups hold roughly as measured, since they skip or
forecast whole blocks or attention layers in proportion to the depth. 1024 px, 28 steps, bf16,
batch 1, T5 prompts of 128 tokens from random token ids (no text encoders: prompt embeddings are
random, which changes nothing about the transformer's cost).

    python -m benchmarks gpu-flux                      # needs CUDA; prints a Markdown table
    python -m benchmarks gpu-flux --compile regional   # the same, transformer blocks compiled
    python -m benchmarks gpu-flux --smoke              # the same code on the CPU at a tiny size
    python -m benchmarks gpu-flux --budget-s 80        # no setting starts after 80 s (the check)

`--smoke` proves the script before a GPU session spends its minutes on it (the suite runs it):
a narrow transformer, 128 px, 4 steps, float32 on the CPU, compiled with the eager backend.

Compiled (`--compile regional`: compile_repeated_blocks, fullgraph=False, inductor) every setting
warms up for a full call first, so its compile is not in its seconds; the table adds each
setting's warm-up seconds (compile included), graphs compiled and graph breaks.
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

DEPTH_DOUBLE, DEPTH_SINGLE = 4, 8
SETTINGS = [
    ("baseline", {}),
    ("steps 14 (of 28)", {"steps": {"num_inference_steps": 14}}),
    ("fbcache 0.12", {"fbcache": {"threshold": 0.12}}),
    ("taylorseer 5/3/1", {"taylorseer": {"cache_interval": 5, "disable_cache_before_step": 3}}),
    ("taylorseer lite 5/3/1", {"taylorseer": {"cache_interval": 5, "disable_cache_before_step": 3,
                                              "use_lite_mode": True}}),
    ("pab 2, (100, 800)", {"pab": {"spatial_attention_block_skip_range": 2}}),
    ("magcache 0.06/3/0.2", {"magcache": {}}),
    ("dbcache F1B0 0.08 (cache-dit default)", {"dbcache": {"residual_diff_threshold": 0.08}}),
    ("dbcache F1B0 steps mask fast, static (11 of 28 full)",  # a masked step's real cost
     {"dbcache": {"steps_computation_mask": "fast", "steps_computation_policy": "static"}}),
    ("dbcache F8B0 0.12 + TaylorSeer 1", {"dbcache": {"Fn_compute_blocks": 8,
                                                      "residual_diff_threshold": 0.12,
                                                      "taylorseer_order": 1}}),
    # random weights: residual differences sit far above real-model thresholds; the calibrated
    # range's top (filled in by main) is what "skips nearly everything" costs
    ("dbcache F1B0 at the calibrated max", {"dbcache": {}}),
]


# FLUX.1's width; --smoke: the same code at a size the CPU runs in seconds
FULL = dict(device="cuda", dtype=torch.bfloat16, size=1024, steps=28, heads=24, head_dim=128,
            text_dim=4096, pooled_dim=768, rope=[16, 56, 56], vae=(128, 256, 512, 512))
SMOKE = dict(device="cpu", dtype=torch.float32, size=128, steps=4, heads=2, head_dim=16,
             text_dim=32, pooled_dim=16, rope=[4, 6, 6], vae=(32, 32, 32, 32))


def build(size: dict = FULL):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(size["device"]):  # random init where it runs: seconds, not a minute
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=DEPTH_DOUBLE, num_single_layers=DEPTH_SINGLE,
            attention_head_dim=size["head_dim"], num_attention_heads=size["heads"],
            joint_attention_dim=size["text_dim"], pooled_projection_dim=size["pooled_dim"],
            guidance_embeds=True, axes_dims_rope=size["rope"],
        )
    cast_as_loaded(transformer, size["device"], size["dtype"])
    vae = AutoencoderKL(block_out_channels=size["vae"], latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                        scaling_factor=0.3611).to(size["device"], size["dtype"])
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(compile: str = "none", smoke: bool = False, budget_s: float = 0.0) -> None:
    size = size_for("gpu_flux.py", smoke, FULL, SMOKE)
    started = time.perf_counter()
    deadline = started + budget_s if budget_s else None  # no setting starts after it
    pipe = build(size)
    device, dtype, steps = size["device"], size["dtype"], size["steps"]
    embeds = torch.randn(1, 128, size["text_dim"], device=device, dtype=dtype)
    pooled = torch.randn(1, size["pooled_dim"], device=device, dtype=dtype)

    def call(target, steps=steps):
        synchronize()
        start = time.perf_counter()
        target(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=size["size"],
               width=size["size"], num_inference_steps=steps, guidance_scale=3.5,
               output_type="latent", generator=torch.Generator(device).manual_seed(0))
        synchronize()
        return time.perf_counter() - start

    compiles = None
    if compile == "regional":
        pipe.transformer.compile_repeated_blocks(fullgraph=False,
                                                 backend="eager" if smoke else "inductor")
        compiles = {}
    call(pipe, steps if compiles is not None else 3)
    timed = time_cache_settings(pipe, call, at_steps(SETTINGS, steps),
                                steps, warmup=steps if compiles is not None else 4, repeats=2,
                                compiles=compiles, deadline=deadline)
    rows = [[name, seconds, timed[0][1] / seconds, computed, "-" if peak is None else peak]
            for name, seconds, computed, peak in timed]
    headers = ["setting", "s/image", "speedup", "computed", "peak GiB"]
    if compiles is not None:
        headers += ["warm-up s (compile)", "graphs compiled", "graph breaks"]
        for row in rows:
            counts = compiles[row[0]]
            row += [counts["warmup_seconds"], counts["graphs_compiled"] + counts["compiled_while_timed"],
                    counts["graph_breaks"]]
    scale = (19 + 38 * 0.5) / (DEPTH_DOUBLE + DEPTH_SINGLE * 0.5)
    print(f"\n# {'SMOKE (CPU, tiny: not a measurement)' if smoke else 'GPU'}, FLUX width, "
          f"{DEPTH_DOUBLE}+{DEPTH_SINGLE} blocks (full: 19+38, ~{scale:.1f}x the cost), "
          f"{size['size']} px, {steps} steps, {str(dtype).removeprefix('torch.')}, batch 1, "
          f"transformer only, compile {compile} ({machine()})")
    print(table(headers, rows))
    if compile == "none" and (deadline is None or time.perf_counter() < deadline + 60):
        print(determinism(pipe, call))
    print(f"total {time.perf_counter() - started:.0f} s")


def determinism(pipe, call) -> str:
    """Do two plain calls give the same latents here (what lets workers of one device share
    baseline images: optimize/baseline.py), and what the pipeline signature costs at this size."""
    outputs = []
    original = pipe.__call__

    def keep(*args, **kwargs):
        output = original(*args, **kwargs)
        outputs.append(output.images.float().cpu())
        return output

    call(keep)
    call(keep)
    same = torch.equal(outputs[0], outputs[1])
    difference = "bit-identical" if same else \
        f"differ (max |diff| {(outputs[0] - outputs[1]).abs().max().item():.3g})"
    from optsearch.measure.fingerprint import pipeline_signature

    start = time.perf_counter()
    pipeline_signature(pipe)
    seconds = time.perf_counter() - start
    count = sum(p.numel() for p in pipe.transformer.parameters()) + sum(
        p.numel() for p in pipe.vae.parameters())
    return (f"determinism: two plain calls' latents {difference}; pipeline signature of "
            f"{count / 1e9:.2f} G parameters in {seconds:.2f} s")

