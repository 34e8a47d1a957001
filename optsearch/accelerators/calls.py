"""What a pipeline's call takes and does, told from its signature and source without running it:
its parameters (a subclass's and its parents'), an argument by name or position, whether guidance
runs as separate denoiser calls, and whether its loop names the cache context diffusers' hooks
key their state by (and the two forward hooks that name it where it does not).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping


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
        negative = any(call_kwargs.get(name) is not None
                       for name in ("negative_prompt", "negative_prompt_embeds"))
        return negative and float(given("true_cfg_scale") or 1.0) > 1.0
    scale = given("guidance_scale")
    return scale is None or float(scale) > 1.0


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
