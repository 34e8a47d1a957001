"""What a pipeline's call takes and does, told from its signature and source without running it:
its parameters (a subclass's and its parents'), an argument by name or position, whether guidance
runs as separate denoiser calls, and whether its loop names the cache context diffusers' hooks
key their state by (and the two forward hooks that name it where it does not).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import SimpleNamespace


def call_parameters(pipe) -> Mapping[str, inspect.Parameter]:
    """The arguments the pipeline class's `__call__` takes, with their defaults. A subclass that
    passes `**kwargs` on (a factory's pipeline with its own defaults) also takes its parent's
    arguments; its own defaults come first."""
    parameters: dict[str, inspect.Parameter] = {}
    for cls in type(pipe).__mro__:
        if "__call__" not in vars(cls):
            continue
        own = inspect.signature(vars(cls)["__call__"]).parameters
        for name, parameter in own.items():
            if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                parameters.setdefault(name, parameter)
        if not any(p.kind == p.VAR_KEYWORD for p in own.values()):
            break
    return parameters


def call_argument(pipe, name: str, args: tuple, kwargs: Mapping):
    """The value a call passed for `name`, by keyword or by position (FLUX Kontext's call takes
    the image first and the prompt second), else None."""
    if name in kwargs:
        return kwargs[name]
    names = [n for n in call_parameters(pipe) if n != "self"]
    position = names.index(name) if name in names else None
    return args[position] if position is not None and position < len(args) else None


def runs_separate_cfg(pipe, call_kwargs) -> bool:
    """Does this call run guidance as separate transformer calls (on a pipeline that can)?
    Qwen-Image's true CFG needs true_cfg_scale > 1 and a negative prompt; a call that takes no
    negative prompt has none (FLUX Fill: its guidance_scale is distilled into the transformer);
    elsewhere guidance_scale > 1 (the call's, else the pipeline's default)."""
    params = call_parameters(pipe)
    if "negative_prompt" not in params and "negative_prompt_embeds" not in params:
        return False

    def given(name):
        value = call_kwargs.get(name)
        return value if value is not None or name not in params else params[name].default

    if "true_cfg_scale" in params:
        return true_cfg_ran(pipe, (), call_kwargs) > 1.0
    scale = given("guidance_scale")
    return scale is None or float(scale) > 1.0


def true_cfg_ran(pipe, args: tuple, kwargs: Mapping) -> float | None:
    """The true CFG scale a call runs at, where the pipeline takes one (Qwen-Image, FLUX): the
    given (else default) scale with a negative prompt, 1.0 without (true CFG needs one: one
    pass); None where it takes none."""
    defaults = call_parameters(pipe)
    if "true_cfg_scale" not in defaults:
        return None
    if all(call_argument(pipe, name, args, kwargs) is None
           for name in ("negative_prompt", "negative_prompt_embeds")):
        return 1.0
    given = kwargs.get("true_cfg_scale")
    scale = given if given is not None else defaults["true_cfg_scale"].default
    return float(scale) if scale is not None else 1.0


def sets_cache_context(pipe) -> bool:
    """Does the pipeline's denoising loop name its denoiser calls (diffusers' `cache_context`,
    which keys the cache hooks' state)? FLUX Kontext, Fill and image-to-image do not (diffusers
    0.42), and diffusers' hooks then fail at the first step. Assumed so when no source is found
    (a class defined in a notebook is passed over: its parents' loop decides)."""
    read = False
    for cls in type(pipe).__mro__:
        call = vars(cls).get("__call__")
        if call is None:
            continue
        try:
            source = inspect.getsource(call)
        except (OSError, TypeError):
            continue
        read = True
        if "cache_context" in source:
            return True
    return not read


def enter_cond_context(module, args) -> None:
    """A forward pre-hook: the call runs in cache context "cond" (see `HookPatch._name_calls`)."""
    module._optsearch_context = module.cache_context("cond")
    module._optsearch_context.__enter__()


def leave_cache_context(module, args, output) -> None:
    module.__dict__.pop("_optsearch_context").__exit__(None, None, None)


def denoised_steps(steps: int, strength: float | None, rounds_up: bool = False) -> int:
    """The denoising steps an image-to-image call of `steps` steps runs at `strength`, as diffusers
    counts them. Stable Diffusion's pipelines (UNets, and the video ones) start the schedule
    int(steps * strength) steps before its end. FLUX's, SD3's and Qwen-Image's (`rounds_up`) skip
    int(steps - steps * strength) steps and denoise the rest: one step more, at most. What a spec
    counts its step ranges in; the loaded pipeline's own count is `call_steps`."""
    if strength is None:
        return steps
    if rounds_up:
        return steps - int(max(steps - min(steps * strength, steps), 0))
    return min(int(steps * strength), steps)


def call_steps(pipe, call_kwargs: Mapping, steps: int | None = None) -> int:
    """The denoising steps a call runs: its `num_inference_steps` (else `steps`), or at a
    `strength`, what the pipeline's own `get_timesteps` keeps of them (run on a stand-in
    scheduler: the pipeline's scheduler is not touched), else Stable Diffusion's rounding."""
    steps = int(call_kwargs.get("num_inference_steps") or steps or 0)
    strength = call_kwargs.get("strength")
    if strength is None or "strength" not in call_parameters(pipe):
        return steps
    get_timesteps = getattr(type(pipe), "get_timesteps", None)
    order = int(getattr(getattr(pipe, "scheduler", None), "order", 1) or 1)
    stand_in = SimpleNamespace(scheduler=SimpleNamespace(
        timesteps=list(range(steps * order)), order=order, set_begin_index=lambda _index: None))
    try:
        _, count = get_timesteps(stand_in, num_inference_steps=steps, strength=strength,
                                 device="cpu")
        return int(count)
    except Exception:  # noqa: BLE001 - none, or another signature (video-to-video): SD's rounding
        return denoised_steps(steps, strength)
