"""First Block Cache (ParaAttention, in diffusers as `FirstBlockCacheConfig`): run the first
transformer block every step; when its residual changed less than `threshold` (relative L1) since
the last full step, reuse the cached output of all the other blocks."""

from __future__ import annotations

from optsearch.accelerators.base import Param
from optsearch.accelerators.hooks import cache_patch

NAME = "fbcache"
APPLIES_TO = ("transformer",)
PARAMS = (
    Param("threshold", float, (0.02, 0.5), minimum=0.0, grid_step=0.02,
          help="relative change of the first block's residual under which the rest is reused"),
)


def apply(pipe, threshold: float = 0.05):
    from diffusers import FirstBlockCacheConfig

    return cache_patch(pipe, FirstBlockCacheConfig(threshold=float(threshold)), NAME)


def warmup_steps(**_) -> int:
    """The first step always computes; the next ones go through the compare-and-reuse path."""
    return 3
