"""ToMe for SD (tomesd): merge redundant tokens before self-attention.

tomesd draws its random merge pattern from one generator forked from the global torch RNG when the
first attention runs. We hand it a generator seeded by us before every batch, so every batch sees
the same pattern whatever the batch size (measured: per-prompt images identical at batch sizes
2 and 3). `tomesd.remove_patch` restores exactly.
"""

from __future__ import annotations

from optsearch.accelerators.base import Param
from optsearch.accelerators.hooks import execution_device

NAME = "tome"
APPLIES_TO = ("unet",)
PARAMS = (
    Param("ratio", float, (0.1, 0.7), minimum=0.0, maximum=1.0, exclusive_maximum=True,
          grid_step=0.1, help="share of tokens merged"),
    Param("max_downsample", int, (1, 2), minimum=1, maximum=8,
          help="merge in layers downsampled at most this much (1, 2, 4 or 8)"),
    Param("use_rand", bool, (True,), help="random merge pattern (seeded per batch)"),
)


class ToMePatch:
    """tomesd applied to a pipeline; `reseed()` before each batch, `restore()` to remove."""

    def __init__(self, pipe, ratio: float, max_downsample: int, use_rand: bool):
        import tomesd

        self.pipe = pipe
        tomesd.apply_patch(pipe, ratio=ratio, max_downsample=max_downsample, use_rand=use_rand)

    def reseed(self, seed: int) -> None:
        """Give tomesd a fresh generator so the merge pattern is the same for every batch."""
        import torch

        device = execution_device(self.pipe)  # offloaded: the UNet waits on the host
        generator = torch.Generator(device=device).manual_seed(seed)
        self.pipe.unet._tome_info["args"]["generator"] = generator

    def restore(self) -> None:
        import tomesd

        tomesd.remove_patch(self.pipe)
        for module in self.pipe.unet.modules():
            if "_tome_info" in module.__dict__:
                del module._tome_info


def apply(pipe, ratio: float = 0.5, max_downsample: int = 1, use_rand: bool = True) -> ToMePatch:
    return ToMePatch(pipe, float(ratio), int(max_downsample), bool(use_rand))


def warmup_steps(**_) -> int:
    """Merging runs at every step: one step goes through it."""
    return 1
