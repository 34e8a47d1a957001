"""FasterCache (in diffusers as `FasterCacheConfig`), made for video transformers: inside a
timestep window, compute each spatial self-attention only every `spatial_attention_block_skip_range`
steps and reuse it between (with a weighted blend of the last two outputs); on pipelines that
batch the unconditional and conditional halves of classifier-free guidance in one call
(CogVideoX, Mochi, Latte, Allegro), also compute the unconditional half only every
`unconditional_batch_skip_range` steps and approximate it in between from the conditional one's
frequencies.

Wan and HunyuanVideo run the two halves as separate calls (or have no unconditional one), so the
cache is told they are guidance-distilled: only the attention reuse acts there. Applied through the
transformer's `enable_cache`; `disable_cache` and HookPatch restore it bit-exactly.

As with PAB, the window and the skip range only decide at which denoiser calls the attention is
reused: the timestep of each call is measured once per device (`pab.measure_timesteps`) and a
setting is known by the calls it reuses at (`computation`).

On Wan 2.2 A14B's second expert, diffusers' hooks would reuse at the expert's first call (inside
the window, with nothing cached: it fails). Its hooks read that call's timestep as outside every
window (`second_expert_timestep`), so it computes and caches, as the first expert's first call
does; the Python export writes the same callback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from optsearch.accelerators.base import Param
from optsearch.accelerators.hooks import HookPatch, cache_patch, denoisers
from optsearch.accelerators.pab import BroadcastPatch, expert_calls

NAME = "fastercache"
SAME_COMPUTATION = "same attention reused"  # what a copied twin's record says
DEFAULTS = {"spatial_attention_block_skip_range": 2, "timestep_skip_high": 681,
            "unconditional_batch_skip_range": 5}
APPLIES_TO = ("transformer", "video")
PARAMS = (
    Param("spatial_attention_block_skip_range", int, (2, 6), minimum=2,
          help="spatial self-attention computed every N steps inside the window"),
    Param("timestep_skip_high", int, (500, 1000), minimum=0, maximum=1000, grid_step=100,
          help="the window's upper timestep (0-1000 scale; attention is reused below it)"),
    Param("unconditional_batch_skip_range", int, (5,), minimum=1,
          help="the unconditional half computed every N steps (batched-guidance pipelines only)"),
)
# Pipelines whose transformer sees [unconditional, conditional] in one batch.
BATCHED_GUIDANCE = ("CogVideoX", "Mochi", "Latte", "Allegro")
FRAMES_FIRST = ("CogVideoX",)  # latents as batch, frames, channels, height, width


def batches_guidance(pipe) -> bool:
    return type(pipe).__name__.startswith(BATCHED_GUIDANCE)


class FasterCachePatch(BroadcastPatch):
    """FasterCache's hooks, with the share of the hooked calls that ran: counted by HookPatch on
    an eager denoiser; on a compiled one told by the measured timesteps (`computation`), where
    the denoiser's own hook computes at every call and each attention hook at the calls it does
    not reuse. Not told where one call holds both guidance halves (its unconditional skip)."""

    def __init__(self, patch: HookPatch, params: Mapping, measured: Mapping, batched: bool):
        from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK

        super().__init__(patch, params, measured)
        self.batched = batched
        registries = [m.__dict__["_diffusers_hook"] for m in patch.submodules()
                      if "_diffusers_hook" in m.__dict__]
        self.hooks = {name: sum(r.get_hook(name) is not None for r in registries)
                      for name in (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK)}

    def _told_fraction(self) -> float | None:
        told = None if self.batched else computation(self.params, self.steps, self.measured)
        if told is None:
            return None
        calls = len(self.measured["timesteps"])
        whole, blocks = self.hooks.values()
        return (whole * calls + blocks * (calls - len(told["reused_calls"]))) / ((whole + blocks) * calls)


def apply(pipe, spatial_attention_block_skip_range: int = DEFAULTS["spatial_attention_block_skip_range"],
          timestep_skip_high: int = DEFAULTS["timestep_skip_high"],
          unconditional_batch_skip_range: int = DEFAULTS["unconditional_batch_skip_range"],
          **measured) -> FasterCachePatch:
    """`measured`: the timesteps `pab.measure_timesteps` found, which change nothing it does
    (they tell what ran on a compiled denoiser)."""
    from diffusers import FasterCacheConfig

    frames_first = type(pipe).__name__.startswith(FRAMES_FIRST)
    options = dict(
        spatial_attention_block_skip_range=int(spatial_attention_block_skip_range),
        spatial_attention_timestep_skip_range=(-1, int(timestep_skip_high)),
        unconditional_batch_skip_range=int(unconditional_batch_skip_range),
        attention_weight_callback=lambda _module: 0.5,  # diffusers' documented default weight
        tensor_format="BFCHW" if frames_first else "BCFHW",
        is_guidance_distilled=not batches_guidance(pipe),
    )
    config = [FasterCacheConfig(**options, current_timestep_callback=lambda: pipe.current_timestep)]
    if len(denoisers(pipe)) == 2:  # Wan 2.2 A14B: the second expert computes its first call
        config.append(FasterCacheConfig(**options,
                                        current_timestep_callback=lambda: second_expert_timestep(pipe)))
    # diffusers warns "purely experimental" at every enable: once per trial is noise, said in the docs
    logging.getLogger("diffusers.hooks.faster_cache").setLevel(logging.ERROR)
    params = dict(spatial_attention_block_skip_range=spatial_attention_block_skip_range,
                  timestep_skip_high=timestep_skip_high,
                  unconditional_batch_skip_range=unconditional_batch_skip_range)
    return FasterCachePatch(cache_patch(pipe, config, NAME), params, measured, batches_guidance(pipe))


def computation(params: Mapping, steps: int, calibration: Mapping) -> dict | None:
    """What a setting computes in a call of `steps` steps, told by the measured timesteps (None
    without them, or when they were measured at another step count): the denoiser calls at which
    the spatial attention is reused. diffusers' `FasterCacheBlockHook` reuses inside the window
    (`-1 < timestep < high`) except at every `skip range`-th call after the first; whether a
    guidance batch allows it at that call follows the unconditional schedule, the same for every
    setting of one `unconditional_batch_skip_range`."""
    if calibration.get("step_count") != steps or not calibration.get("timesteps"):
        return None
    drawn = {**DEFAULTS, **params}
    high, every = float(drawn["timestep_skip_high"]), int(drawn["spatial_attention_block_skip_range"])
    experts = calibration.get("experts") or [0] * len(calibration["timesteps"])
    first_of_second = next((timestep for expert, timestep in zip(experts, calibration["timesteps"],
                                                                 strict=True) if expert == 1), None)
    return {"reused_calls": [
        call for call, ((own, timestep), expert) in enumerate(zip(expert_calls(calibration), experts,
                                                                  strict=True))
        if -1 < timestep < high and not (own > 0 and own % every == 0)
        and not (expert == 1 and timestep == first_of_second)],  # read as outside the window
        "unconditional_batch_skip_range": int(drawn["unconditional_batch_skip_range"])}


def second_expert_timestep(pipe):
    """The timestep Wan 2.2 A14B's second expert's hooks read: the pipeline's, except at the
    expert's first step (the first timestep below the boundary), which reads as outside every
    window, so its first calls compute and cache what the next ones reuse. Tensor operations
    only: inside a compiled block a Python number would break the graph."""
    import torch

    timestep, timesteps = pipe.current_timestep, pipe.scheduler.timesteps
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    first = torch.where(timesteps < boundary, timesteps, -math.inf).max()  # they run high to low
    return torch.where(timestep == first, math.inf, timestep)


def problem_with(pipe, values: Mapping | None = None) -> str | None:
    """FasterCache reads the pipeline's current timestep (diffusers' video pipelines track it).
    Its hooks reuse from their first call inside the window: Wan 2.2's second expert starts
    there, with nothing cached yet (diffusers fails: measured on builtin:tiny-wan22), unless its
    first step reads as outside the window, which the boundary tells."""
    if not hasattr(type(pipe), "current_timestep"):
        return (f"fastercache needs a pipeline that tracks its current timestep "
                f"({type(pipe).__name__} does not)")
    if getattr(pipe, "transformer_2", None) is not None \
            and getattr(getattr(pipe, "config", None), "boundary_ratio", None) is None:
        return ("fastercache on a second expert (transformer_2) needs the pipeline's "
                "boundary_ratio, which tells the expert's first step")
    return None


def warmup_steps(spatial_attention_block_skip_range: int = 2, **_) -> int:
    return int(spatial_attention_block_skip_range) + 1
