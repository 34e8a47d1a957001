"""ToMe for SD (tomesd): merge redundant tokens before self-attention.

tomesd draws its random merge pattern from one generator forked from the global torch RNG when the
first attention runs. We hand it a generator seeded by us before every batch, so every batch sees
the same pattern whatever the batch size (measured: per-prompt images identical at batch sizes
2 and 3). `tomesd.remove_patch` restores exactly.

tomesd merges `int(tokens * ratio)` tokens at each attention level it reaches, so neighbouring
ratios often merge the same counts: one computation, the same images bit for bit. The token
count of each level is measured once per device (`measure_tokens`) and a setting is then known
by the counts it merges (`computation`), as MagCache's thresholds are by the steps they skip.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from optsearch.accelerators.base import Param
from optsearch.accelerators.hooks import execution_device

NAME = "tome"
APPLIES_TO = ("unet",)
SAME_COMPUTATION = "same tokens merged"  # what a copied twin's record says
DEFAULTS = {"ratio": 0.5, "max_downsample": 1, "use_rand": True}  # tomesd's
PARAMS = (
    Param("ratio", float, (0.1, 0.7), minimum=0.0, maximum=1.0, exclusive_maximum=True,
          grid_step=0.1, help="share of tokens merged"),
    Param("max_downsample", int, (1, 2), minimum=1, maximum=8,
          help="merge in layers downsampled at most this much (1, 2, 4 or 8)"),
    Param("use_rand", bool, (True,), help="random merge pattern (seeded per batch)"),
)


class ToMePatch:
    """tomesd applied to a pipeline; `reseed()` before each batch, `restore()` to remove."""

    def __init__(self, pipe, ratio: float, max_downsample: int, use_rand: bool, measured: Mapping):
        """`measured`: the UNet's token counts (`measure_tokens`), when known."""
        import tomesd

        self.pipe = pipe
        self.computes = computation({"ratio": ratio, "max_downsample": max_downsample,
                                     "use_rand": use_rand}, 0, measured)
        tomesd.apply_patch(pipe, ratio=ratio, max_downsample=max_downsample, use_rand=use_rand)

    def computed_fraction(self) -> float | None:
        """1.0 when the measured levels say it merges nothing (no attention level within
        `max_downsample`: SDXL's first level has none): the baseline plus a patch. Otherwise
        nothing: ToMe merges tokens rather than skipping blocks."""
        return 1.0 if self.computes is not None and not self.computes["merged_tokens"] else None

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


def apply(pipe, ratio: float = DEFAULTS["ratio"], max_downsample: int = DEFAULTS["max_downsample"],
          use_rand: bool = DEFAULTS["use_rand"], **measured) -> ToMePatch:
    """`measured`: the token counts `measure_tokens` found, which change nothing tomesd does."""
    return ToMePatch(pipe, float(ratio), int(max_downsample), bool(use_rand), measured)


def measure_tokens(pipe, run_once: Callable[[], object]) -> dict:
    """The UNet's latent size and the token count at each attention level, as tomesd sees them
    in one plain call `run_once()`: {"latent_size": [h, w], "tokens": {downsample: count}}, the
    downsample computed as tomesd computes it (no tokens when blocks of one level see different
    counts). Measured eagerly: a compiled UNet is not recompiled for the hooks."""
    import torch

    unet, seen, size = pipe.unet, {}, []

    def on_unet(_module, args, kwargs):
        if not size:
            sample = args[0] if args else kwargs["sample"]
            size.extend(int(n) for n in sample.shape[2:4])

    def on_block(_module, args, kwargs):
        if len(size) == 2:
            tokens = int((args[0] if args else kwargs["hidden_states"]).shape[1])
            seen.setdefault(str(_downsample(size, tokens)), set()).add(tokens)

    blocks = [module for module in unet.modules()
              if any(cls.__name__ == "BasicTransformerBlock" for cls in type(module).__mro__)]
    handles = [unet.register_forward_pre_hook(on_unet, with_kwargs=True)]
    handles += [block.register_forward_pre_hook(on_block, with_kwargs=True) for block in blocks]
    try:
        with torch.compiler.set_stance("force_eager"):
            run_once()
    finally:
        for handle in handles:
            handle.remove()
    if any(len(counts) > 1 for counts in seen.values()):  # blocks of other shapes at one level:
        return {"latent_size": size, "tokens": {}}  # no count to key by: compared as written
    levels = sorted(seen, key=int)
    return {"latent_size": size, "tokens": {level: seen[level].pop() for level in levels}}


def _downsample(size: list[int], tokens: int) -> int:
    """tomesd's `compute_merge`: how far a level of `tokens` tokens is downsampled."""
    return int(math.ceil(math.sqrt(size[0] * size[1] // tokens)))


def computation(params: Mapping, _steps: int, calibration: Mapping) -> dict | None:
    """What a setting computes, told by the measured token counts alone (None without them):
    the tokens it merges at each level it reaches (tomesd's `int(tokens * ratio)`, capped at
    the level's source tokens as its matching caps it; a level that merges none is left out), and
    whether the pattern is random. Two ratios that merge the same counts compute the same."""
    if not calibration.get("tokens"):
        return None
    drawn = {**DEFAULTS, **params}
    height, width = calibration["latent_size"]
    merged = {}
    for level, tokens in calibration["tokens"].items():
        downsample = int(level)
        if downsample > int(drawn["max_downsample"]):
            continue
        rows, columns = math.ceil(height / downsample), math.ceil(width / downsample)
        sources = tokens - (rows // 2) * (columns // 2)  # the rest are the 2x2 cells' targets
        count = min(int(tokens * float(drawn["ratio"])), sources)
        if count > 0:
            merged[level] = count
    return {"merged_tokens": merged, "use_rand": bool(drawn["use_rand"])} if merged else {"merged_tokens": {}}


def telling_values(param: str, low: float, high: float, calibration: Mapping) -> list[float] | None:
    """Ratios in [low, high] that meet every combination of merge counts the measured levels
    allow there (the ends, and the middle between each two points where a level's count
    changes): what counting the space's computations needs of a continuous ratio."""
    if param != "ratio" or not calibration.get("tokens"):
        return None
    changes = sorted({low, high} | {k / n for n in calibration["tokens"].values()
                                    for k in range(math.ceil(low * n), math.floor(high * n) + 1)
                                    if low < k / n < high})
    return [low, high] + [(a + b) / 2 for a, b in zip(changes, changes[1:], strict=False)]


def warmup_steps(**_) -> int:
    """Merging runs at every step: one step goes through it."""
    return 1


def idle_max_downsample(measured: Mapping, values: list[int]) -> list[int]:
    """The `max_downsample` values that merge nothing on this UNet: below its first attention
    level (SDXL's attention starts at 2x downsampling)."""
    levels = [int(level) for level in measured.get("tokens") or {}]
    return [value for value in values if levels and value < min(levels)]


def idle_warning(measured: Mapping, values: list[int]) -> str | None:
    """One line when some of the `max_downsample` values searched merge nothing here."""
    idle = idle_max_downsample(measured, values)
    if not idle:
        return None
    first = min(int(level) for level in measured["tokens"])
    return (f"warning: space.tome.max_downsample = {', '.join(map(str, idle))} merges nothing here "
            f"(the attention starts at {first}x downsampling): those trials time the baseline; "
            f"search from {first}")
