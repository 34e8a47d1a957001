"""TaylorSeer (in diffusers as `TaylorSeerCacheConfig`): compute the attention outputs fully every
`cache_interval` steps and forecast them in between with a Taylor expansion of order `max_order`;
the first `disable_cache_before_step` steps are always computed. `use_lite_mode` (diffusers'
TaylorSeer-Lite) forecasts only the transformer's output projection and skips whole blocks in
between: it keeps one feature's factors, not every attention layer's, and it hooks models whose
attention modules the default identifiers miss (Wan's `attn1`/`attn2`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from optsearch.accelerators.base import Param, as_list
from optsearch.accelerators.hooks import (
    cache_patch,
    call_parameters,
    cpu_safe_dtype,
    denoisers,
    first_expert_steps,
    pipeline_kind,
)

NAME = "taylorseer"
APPLIES_TO = ("transformer", "video")
PARAMS = (
    Param("cache_interval", int, (2, 8), minimum=1, help="full computation every N steps"),
    Param("disable_cache_before_step", int, (1, 8), minimum=0, counts_steps=True,
          help="steps always computed at the start (<= the setting's steps)"),
    Param("max_order", int, (1, 2), minimum=0, maximum=4, help="order of the Taylor forecast"),
    # video: full mode hooks nothing of Wan, and keeps factors of every attention layer's
    # output (video tokens: gigabytes); lite keeps the output projection's alone
    Param("use_lite_mode", bool, (False,), choices=(False, True), default_by_kind=(("video", (True,)),),
          help="forecast the output projection only, skipping whole blocks (the default on "
               "video pipelines); [false, true] searches both"),
)


def problem_with(pipe, values: Mapping | None = None) -> str | None:
    """diffusers' TaylorSeer hooks the attention modules its identifiers name ("blocks.N.attn",
    "transformer_blocks.N.attn", ...): Wan's (and CogVideoX's) are `attn1`/`attn2`, which none
    matches, so every trial would run the plain pipeline (measured on builtin:tiny-wan: no hook,
    the plain videos bit for bit). Lite mode hooks the blocks and `proj_out` instead. `values`:
    the setting's or the study's (`use_lite_mode`: a value or the values searched)."""
    try:
        from diffusers.hooks.taylorseer_cache import (
            _BLOCK_IDENTIFIERS,
            _PROJ_OUT_IDENTIFIERS,
            _TRANSFORMER_BLOCK_IDENTIFIERS,
        )
    except ImportError:  # another diffusers: its own enable_cache decides
        return None
    lite = (values or {}).get("use_lite_mode")
    lite = lite_by_default(pipe) if lite is None else lite
    modes = {bool(mode) for mode in as_list(lite)}
    for model in denoisers(pipe):
        names = [name for name, _ in model.named_modules()]
        if False in modes and not _matches(names, _TRANSFORMER_BLOCK_IDENTIFIERS):
            return (f"taylorseer hooks no module of {type(model).__name__}: diffusers' "
                    "TaylorSeerCacheConfig names attention modules like "
                    f"{_TRANSFORMER_BLOCK_IDENTIFIERS[0]!r}, and none of this model's matches "
                    "(every step would run in full); use_lite_mode = true ([space.taylorseer] in a "
                    "spec) forecasts its output projection instead")
        if True in modes:
            missing = [kind for kind, patterns in (("blocks", _BLOCK_IDENTIFIERS),
                                                   ("output projection", _PROJ_OUT_IDENTIFIERS))
                       if not _matches(names, patterns)]
            if missing:
                return (f"taylorseer's lite mode finds no {missing[0]} in {type(model).__name__} "
                        f"(diffusers looks for {_BLOCK_IDENTIFIERS[0]!r} and "
                        f"{_PROJ_OUT_IDENTIFIERS[0]!r})")
    return None


def lite_by_default(pipe) -> bool:
    """Lite mode where a setting names none: on video pipelines, as a spec's default (full mode
    hooks nothing of Wan, and would keep every attention output's factors over a video's tokens)."""
    return pipeline_kind(pipe) == "video"


def _matches(names: list[str], patterns) -> bool:
    return any(re.fullmatch(pattern, name) for name in names for pattern in patterns)


class TaylorSeerPatch:
    """diffusers' TaylorSeer. It computes each hooked module on a fixed schedule of its own
    calls, so what ran is counted on an eager denoiser and, on a compiled one (where counting
    would change what is compiled), told by replaying the schedule (`computed_steps`)."""

    def __init__(self, pipe, options: dict):
        from diffusers import TaylorSeerCacheConfig

        self.pipe = pipe
        self.options = options
        self.patch = cache_patch(pipe, TaylorSeerCacheConfig(**options), NAME)
        default = call_parameters(pipe).get("num_inference_steps")  # a call that names none
        self.default_steps = getattr(default, "default", None)
        self.steps: int | None = None

    def prepare(self, call_kwargs: dict) -> None:
        self.steps = call_kwargs.get("num_inference_steps", self.default_steps)
        self.patch.prepare(call_kwargs)

    def computed_fraction(self) -> float | None:
        return self.patch.computed_fraction(told=self._replayed_fraction)

    def _replayed_fraction(self) -> float | None:
        """Every hooked module runs the schedule over its denoiser's steps (one per step in each
        guidance context; Wan 2.2's experts split the call's steps, the same blocks in each);
        None where the call's steps are unknown."""
        if not isinstance(self.steps, int) or self.steps < 1:
            return None
        first = self.steps if len(self.patch.modules) == 1 else first_expert_steps(self.pipe, self.steps)[-1]
        interval, before = self.options["cache_interval"], self.options["disable_cache_before_step"]
        return (computed_steps(first, interval, before)
                + computed_steps(self.steps - first, interval, before)) / self.steps

    def restore(self) -> None:
        self.patch.restore()


def computed_steps(steps: int, cache_interval: int, disable_cache_before_step: int) -> int:
    """How many of a block's `steps` calls compute, as diffusers' TaylorSeerCacheHook decides:
    the first `disable_cache_before_step`, then one every `cache_interval` after the next."""
    return sum(1 for step in range(steps) if step < disable_cache_before_step
               or (step - disable_cache_before_step - 1) % cache_interval == 0)


def held_factor_bytes(pipe) -> int:
    """The bytes of the Taylor factors TaylorSeer's hooks hold now, over every guidance context
    (read from diffusers' hook states; the pipeline clears them when its call ends)."""
    total = 0
    for model in denoisers(pipe):
        for module in model.modules():
            registry = module.__dict__.get("_diffusers_hook")
            for hook in (registry.hooks.values() if registry is not None else ()):
                states = getattr(getattr(hook, "state_manager", None), "_state_cache", {})
                total += sum(factor.nbytes for state in states.values()
                             for orders in getattr(state, "taylor_factors", {}).values()
                             for factor in orders.values())
    return total


def peak_factor_bytes(pipe, run: Callable[[int], object], max_order: int, use_lite_mode: bool) -> int:
    """The most factor bytes TaylorSeer holds in a call at `max_order`: the memory it adds to
    the plain pipeline's. Enabled to compute every step, it runs one plain call `run(steps)` of
    enough steps to fill every order, read after each denoiser call."""
    held = [0]
    patch = apply(pipe, cache_interval=1, disable_cache_before_step=max_order + 1,
                  max_order=max_order, use_lite_mode=use_lite_mode)
    hooks = [model.register_forward_hook(lambda *_: held.append(held_factor_bytes(pipe)))
             for model in denoisers(pipe)]
    try:
        run(max_order + 2)
    finally:
        for hook in hooks:
            hook.remove()
        patch.restore()
    return max(held)


def apply(pipe, cache_interval: int = 5, disable_cache_before_step: int = 3,
          max_order: int = 1, use_lite_mode: bool | None = None) -> TaylorSeerPatch:
    """`use_lite_mode` None: lite on a video pipeline, full mode elsewhere (`lite_by_default`)."""
    lite = lite_by_default(pipe) if use_lite_mode is None else bool(use_lite_mode)
    options = dict(cache_interval=int(cache_interval),
                   disable_cache_before_step=int(disable_cache_before_step),
                   max_order=int(max_order), use_lite_mode=lite)
    dtype = cpu_safe_dtype(pipe)
    if dtype is not None:
        options["taylor_factors_dtype"] = dtype
    return TaylorSeerPatch(pipe, options)


def warmup_steps(cache_interval: int = 5, disable_cache_before_step: int = 3, **_) -> int:
    """The always-computed start, then one full interval: computed, forecast, computed again."""
    return int(disable_cache_before_step) + int(cache_interval) + 1
