"""How many computations does Pyramid Attention Broadcast's default space hold?

PAB computes a denoiser call's attention, or broadcasts the last one, by three things only: the
call's timestep inside the window, the call's index, and the skip range (diffusers'
`PyramidAttentionBroadcastHook`). Settings that broadcast at the same calls are one computation
(`pab.computation`). Counted over the default space (skip range 2-6, `timestep_skip_high`
600-1000 in steps of 1, as TPE draws it): on builtin:tiny-flux, from the timesteps one real call
gave; on FLUX.1-dev at 1024 px, from its scheduler alone (its published config, the pipeline's own
shift for 4,096 image tokens: no weights needed). Then how often uniform draws of a study's
share of PAB trials fall on a computation drawn before (TPE, which narrows, draws them more).
"""

from __future__ import annotations

import random

import numpy as np

from benchmarks.common import machine, table
from optsearch.accelerators import canonical_setting, pab

FLUX_DEV_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
                      "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                      "use_dynamic_shifting": True}  # black-forest-labs/FLUX.1-dev's scheduler_config.json


def flux_dev_timesteps(steps: int, image_tokens: int = 4096) -> list[float]:
    """The timesteps FluxPipeline runs: its sigmas, shifted for the image's token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    mu = calculate_shift(image_tokens, 256, 4096, 0.5, 1.15)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps),
                                      mu=mu)
    return [float(t) for t in timesteps]


def tiny_flux_timesteps(steps: int) -> list[float]:
    from optsearch.measure.models import load_pipeline

    pipe = load_pipeline("builtin:tiny-flux", device="cpu", dtype="float32")
    return pab.measure_timesteps(pipe, steps, lambda: pipe("a cat", num_inference_steps=steps,
                                                           output_type="latent"))["timesteps"]


def space_keys(timesteps: list[float]) -> list[str]:
    """The computation of each setting of the default space, in draw order."""
    measured = {"timesteps": timesteps, "step_count": len(timesteps)}
    return [str(canonical_setting({"pab": {"spatial_attention_block_skip_range": every,
                                           "timestep_skip_high": high}}, len(timesteps), {"pab": measured}))
            for every in range(2, 7) for high in range(600, 1001)]


def repeated_draws(keys: list[str], draws: int, runs: int = 2000) -> float:
    """Mean number of uniform draws (of `draws`) whose computation an earlier draw had."""
    rng = random.Random(0)
    return sum(draws - len(set(rng.choices(keys, k=draws))) for _ in range(runs)) / runs


def main(draws: int = 15) -> None:
    print(f"# PAB's default space as computations ({machine()})")
    rows = []
    for label, timesteps in (("builtin:tiny-flux, 20 steps (one real call)", tiny_flux_timesteps(20)),
                             ("FLUX.1-dev 1024 px, 28 steps (scheduler)", flux_dev_timesteps(28)),
                             ("FLUX.1-dev 1024 px, 50 steps (scheduler)", flux_dev_timesteps(50))):
        keys = space_keys(timesteps)
        inside = sum(600 < t < 1000 for t in timesteps)
        rows.append([label, inside, len(keys), len(set(keys)), f"{repeated_draws(keys, draws):.1f}"])
    print(table(["model", "steps with a timestep in (600, 1000)", "settings", "computations",
                 f"repeats in {draws} uniform draws"], rows))
