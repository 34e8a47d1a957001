"""DeepCache: reuse the UNet's high-level features between steps, recomputing every N steps.

`DeepCacheSDHelper.disable()` puts every wrapped block's original bound `forward` back as an
instance attribute; restore also deletes those, so the modules look exactly as before.
"""

from __future__ import annotations

from collections.abc import Mapping

from optsearch.accelerators.base import Param, as_list

NAME = "deepcache"
APPLIES_TO = ("unet",)
PARAMS = (
    Param("cache_interval", int, (2, 8), minimum=1, counts_steps=True,
          help="full UNet pass every N steps; cached features in between"),
    Param("cache_branch_id", int, (0, 3), minimum=0,
          help="skip branch: block * 3 + layer where the shallow path re-enters"),
)


def problem_with(pipe, values: Mapping | None = None) -> str | None:
    """A skip branch past the UNet's down blocks (3 a block): DeepCache would fail at the
    trial, where the spec can say so at load. `values`: a setting's, or the lists searched."""
    unet = getattr(pipe, "unet", None)
    if unet is None:  # not a UNet pipeline: the family's kind says so first
        return None
    branches = 3 * len(unet.down_blocks)
    too_large = [branch for branch in as_list((values or {}).get("cache_branch_id")) if branch >= branches]
    if too_large:
        return (f"deepcache.cache_branch_id={max(too_large)} is too large for "
                f"{type(unet).__name__}'s {len(unet.down_blocks)} down blocks "
                f"(allowed: 0..{branches - 1})")
    return None


class DeepCachePatch:
    """DeepCache enabled on a pipeline; `restore()` disables it. `computed_fraction()` says how
    much of the UNet's blocks the last call really ran: every block DeepCache may skip is weighed
    by its multiply-adds (parameters x output positions, read on the full first step) and counted
    only when it computed, not when it returned its cached output."""

    def __init__(self, pipe, cache_interval: int, cache_branch_id: int):
        from DeepCache import DeepCacheSDHelper

        if problem := problem_with(pipe, {"cache_branch_id": cache_branch_id}):
            raise ValueError(problem)
        self.unet = pipe.unet
        self.had_forward = {id(m) for m in self.unet.modules() if "forward" in m.__dict__}
        self.helper = DeepCacheSDHelper(pipe=pipe)
        self.helper.set_params(cache_interval=cache_interval, cache_branch_id=cache_branch_id)
        self.helper.enable()
        self.work: dict[tuple, float] = {}  # block -> multiply-adds of one computed call
        self.rows_run = self.rows = 0  # UNet batch rows run in the last call, and in this step
        self.computed = 0.0
        self._originals = dict(self.helper.function_dict)
        for key, forward in self._originals.items():
            if key == "unet_forward":
                self.helper.function_dict[key] = self._count_unet(forward)
            elif key[1] != "block":  # a whole down/up block's work is its layers'
                self.helper.function_dict[key] = self._count_layer(key, forward)

    def _count_unet(self, forward):
        def counted(*args, **kwargs):
            self.rows = int(args[0].shape[0])
            self.rows_run += self.rows
            return forward(*args, **kwargs)
        return counted

    def _count_layer(self, key: tuple, forward):
        def counted(*args, **kwargs):
            result = forward(*args, **kwargs)
            if key not in self.work:
                self.work[key] = _multiply_adds(forward.__self__, result)
            self.computed += self.work[key] * self.rows
            return result
        return counted

    def prepare(self, call_kwargs: dict) -> None:
        self.rows_run, self.computed = 0, 0.0

    def computed_fraction(self) -> float | None:
        full = self.rows_run * sum(self.work.values())
        return min(1.0, self.computed / full) if full else None

    def restore(self) -> None:
        self.helper.function_dict.update(self._originals)
        self.helper.disable()
        for module in self.unet.modules():
            if id(module) not in self.had_forward:
                module.__dict__.pop("forward", None)


def _multiply_adds(module, output) -> float:
    """A layer's convolution and linear work, about: its parameters x its output positions."""
    if isinstance(output, tuple):
        output = output[0]
    output = getattr(output, "sample", output)
    positions = output[0, 0].numel() if output.ndim > 2 else output.shape[-2]
    return float(sum(p.numel() for p in module.parameters()) * positions)


def apply(pipe, cache_interval: int = 3, cache_branch_id: int = 0) -> DeepCachePatch:
    return DeepCachePatch(pipe, int(cache_interval), int(cache_branch_id))


def max_speedup(model_steps: int, cache_interval: int = 3, **_) -> float:
    """One full UNet pass every `cache_interval` steps, a shallow one in between: the UNet runs
    at most `cache_interval` times faster."""
    return float(cache_interval)


def warmup_steps(cache_interval: int = 3, **_) -> int:
    """A full pass, the cached steps, and the next full pass: every code path once."""
    return int(cache_interval) + 1
