"""Pyramid Attention Broadcast (in diffusers as `PyramidAttentionBroadcastConfig`): inside a
timestep window, compute each self-attention only every `spatial_attention_block_skip_range`
steps and broadcast its output to the steps between.

On diffusion transformers it goes through the model's `enable_cache`. The SD UNet has no
`enable_cache`, but its self-attention layers (`...transformer_blocks.N.attn1`) are diffusers
`Attention` modules, so the same hook applies there directly; the test suite checks that it
changes the images. The current timestep comes from the pipeline when it tracks one (FLUX),
otherwise from a forward pre-hook on the UNet that reads the timestep of each call.
"""

from __future__ import annotations

from optsearch.accelerators.base import Param
from optsearch.accelerators.hooks import HookPatch, denoiser

NAME = "pab"
APPLIES_TO = ("unet", "transformer", "video")
PARAMS = (
    Param("spatial_attention_block_skip_range", int, (2, 6), minimum=2,
          help="self-attention computed every N steps inside the window"),
    Param("timestep_skip_low", int, (100,), minimum=0, maximum=1000,
          help="the window's lower timestep (0-1000 scale; noise is high at 1000)"),
    Param("timestep_skip_high", int, (600, 1000), minimum=0, maximum=1000, grid_step=100,
          help="the window's upper timestep"),
)


class _TimestepProbe:
    """The timestep of the denoiser's latest call, read by a forward pre-hook."""

    def __init__(self, module):
        self.value = 1000
        self.handle = module.register_forward_pre_hook(self._read, with_kwargs=True)

    def _read(self, module, args, kwargs) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is not None:
            self.value = float(timestep.flatten()[0]) if hasattr(timestep, "flatten") else timestep

    def __call__(self) -> float:
        return self.value


def apply(pipe, spatial_attention_block_skip_range: int = 2, timestep_skip_low: int = 100,
          timestep_skip_high: int = 800) -> HookPatch:
    from diffusers import PyramidAttentionBroadcastConfig
    from diffusers.hooks import HookRegistry, apply_pyramid_attention_broadcast
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

    if not timestep_skip_low < timestep_skip_high:
        raise ValueError(f"pab.timestep_skip_low={timestep_skip_low} must be below "
                         f"pab.timestep_skip_high={timestep_skip_high}")
    module = denoiser(pipe)
    probe = None
    if hasattr(type(pipe), "current_timestep"):
        def current_timestep():
            return pipe.current_timestep
    else:
        probe = _TimestepProbe(module)
        current_timestep = probe
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=int(spatial_attention_block_skip_range),
        spatial_attention_timestep_skip_range=(int(timestep_skip_low), int(timestep_skip_high)),
        current_timestep_callback=current_timestep,
    )

    def enable(target) -> None:
        if hasattr(target, "enable_cache"):
            target.enable_cache(config)
        else:
            apply_pyramid_attention_broadcast(target, config)

    def disable(target) -> None:
        if probe is not None:
            probe.handle.remove()
        if hasattr(target, "disable_cache"):
            target.disable_cache()
        else:
            registry = HookRegistry.check_if_exists_or_initialize(target)
            registry.remove_hook(_PYRAMID_ATTENTION_BROADCAST_HOOK, recurse=True)

    try:
        return HookPatch(pipe, enable, disable)
    except BaseException:
        if probe is not None:
            probe.handle.remove()
        raise


def warmup_steps(spatial_attention_block_skip_range: int = 2, **_) -> int:
    return int(spatial_attention_block_skip_range) + 1
