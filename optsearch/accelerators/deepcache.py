"""DeepCache: reuse the UNet's high-level features between steps, recomputing every N steps.

`DeepCacheSDHelper.disable()` puts every wrapped block's original bound `forward` back as an
instance attribute; restore also deletes those, so the modules look exactly as before.
"""

from __future__ import annotations

from optsearch.accelerators.base import Param

NAME = "deepcache"
APPLIES_TO = ("unet",)
PARAMS = (
    Param("cache_interval", int, (2, 8), minimum=1, counts_steps=True,
          help="full UNet pass every N steps; cached features in between"),
    Param("cache_branch_id", int, (0, 3), minimum=0,
          help="skip branch: block * 3 + layer where the shallow path re-enters"),
)


class DeepCachePatch:
    """DeepCache enabled on a pipeline; `restore()` disables it."""

    def __init__(self, pipe, cache_interval: int, cache_branch_id: int):
        from DeepCache import DeepCacheSDHelper

        branches = 3 * len(pipe.unet.down_blocks)
        if cache_branch_id >= branches:
            raise ValueError(
                f"deepcache.cache_branch_id={cache_branch_id} is too large for this UNet "
                f"(allowed: 0..{branches - 1})"
            )
        self.unet = pipe.unet
        self.had_forward = {id(m) for m in self.unet.modules() if "forward" in m.__dict__}
        self.helper = DeepCacheSDHelper(pipe=pipe)
        self.helper.set_params(cache_interval=cache_interval, cache_branch_id=cache_branch_id)
        self.helper.enable()

    def restore(self) -> None:
        self.helper.disable()
        for module in self.unet.modules():
            if id(module) not in self.had_forward:
                module.__dict__.pop("forward", None)


def apply(pipe, cache_interval: int = 3, cache_branch_id: int = 0) -> DeepCachePatch:
    return DeepCachePatch(pipe, int(cache_interval), int(cache_branch_id))


def max_speedup(model_steps: int, cache_interval: int = 3, **_) -> float:
    """One full UNet pass every `cache_interval` steps, a shallow one in between: the UNet runs
    at most `cache_interval` times faster."""
    return float(cache_interval)


def warmup_steps(cache_interval: int = 3, **_) -> int:
    """A full pass, the cached steps, and the next full pass: every code path once."""
    return int(cache_interval) + 1
