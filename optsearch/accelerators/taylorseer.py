"""TaylorSeer (in diffusers as `TaylorSeerCacheConfig`): compute the attention outputs fully every
`cache_interval` steps and forecast them in between with a Taylor expansion of order `max_order`;
the first `disable_cache_before_step` steps are always computed."""

from __future__ import annotations

from optsearch.accelerators.base import Param
from optsearch.accelerators.hooks import cache_patch, cpu_safe_dtype

NAME = "taylorseer"
APPLIES_TO = ("transformer", "video")
PARAMS = (
    Param("cache_interval", int, (2, 8), minimum=1, help="full computation every N steps"),
    Param("disable_cache_before_step", int, (1, 8), minimum=0, counts_steps=True,
          help="steps always computed at the start (<= the setting's steps)"),
    Param("max_order", int, (1, 2), minimum=0, maximum=4, help="order of the Taylor forecast"),
)


def apply(pipe, cache_interval: int = 5, disable_cache_before_step: int = 3, max_order: int = 1):
    from diffusers import TaylorSeerCacheConfig

    options = dict(cache_interval=int(cache_interval),
                   disable_cache_before_step=int(disable_cache_before_step),
                   max_order=int(max_order))
    dtype = cpu_safe_dtype(pipe)
    if dtype is not None:
        options["taylor_factors_dtype"] = dtype
    return cache_patch(pipe, TaylorSeerCacheConfig(**options), NAME)


def warmup_steps(cache_interval: int = 5, disable_cache_before_step: int = 3, **_) -> int:
    """The always-computed start, then one full interval: computed, forecast, computed again."""
    return int(disable_cache_before_step) + int(cache_interval) + 1
