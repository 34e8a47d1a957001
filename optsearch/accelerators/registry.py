"""The families there are, which pipelines and combos they take, and what a setting is.

A *setting* is a nested dict: ``{"deepcache": {"cache_interval": 3}, "tome": {"ratio": 0.5}}``.
`normalize_setting` checks one against the families' declared parameters (`base.Param`), and
the step helpers fit step-counted parameters into the steps a setting runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType

from optsearch.accelerators import (
    dbcache,
    deepcache,
    distill,
    fastercache,
    fbcache,
    magcache,
    pab,
    seacache,
    steps,
    taylorseer,
    tgate,
    tome,
)
from optsearch.accelerators.base import Param
from optsearch.accelerators.calls import denoised_steps

REGISTRY: dict[str, ModuleType] = {
    m.NAME: m for m in (distill, steps, deepcache, tome, tgate, pab, fastercache, fbcache, taylorseer,
                        magcache, dbcache, seacache)
}
ORDER = tuple(REGISTRY)
KINDS = ("unet", "transformer", "video")
EXCLUSIVE = ("pab", "fastercache", "fbcache", "taylorseer", "magcache", "dbcache",
             "seacache")  # combine only with steps
COMBOS: tuple[tuple[str, ...], ...] = (  # the original workflow's four, "any" on a UNet
    ("deepcache",),
    ("deepcache", "tome"),
    ("deepcache", "tgate"),
    ("deepcache", "tome", "tgate"),
)
ANY_COMBOS: dict[str, tuple[tuple[str, ...], ...]] = {
    "unet": COMBOS,
    "transformer": (("steps",), ("fbcache",), ("taylorseer",), ("pab",), ("magcache",),
                    ("dbcache",)),
    "video": (("steps",), ("pab",), ("fastercache",), ("fbcache",), ("taylorseer",), ("magcache",),
              ("dbcache",)),
}


def params_of(name: str) -> dict[str, Param]:
    return {p.name: p for p in REGISTRY[name].PARAMS}


def combo_name(accelerators) -> str:
    """The canonical name of a combo, e.g. 'deepcache+tome'; 'baseline' when empty."""
    ordered = [name for name in ORDER if name in accelerators]
    return "+".join(ordered) or "baseline"


def applicable(kind: str) -> list[str]:
    """The families that apply to a pipeline kind ("unet", "transformer" or "video")."""
    return [name for name, module in REGISTRY.items() if kind in module.APPLIES_TO]


def combo_problem(combo: Sequence[str], kind: str | None = None) -> str | None:
    """Why the families of `combo` cannot run together (on a `kind` pipeline), or None."""
    if kind is not None:
        foreign = [name for name in combo if kind not in REGISTRY[name].APPLIES_TO]
        if foreign:
            return (f"{foreign[0]} does not apply to this model ({kind} pipeline; families that "
                    f"do: {', '.join(applicable(kind))})")
    if "distill" in combo and "magcache" in combo:
        return ("magcache's ratios are measured on the plain model at its full steps; they do not "
                "hold for a step-distilled LoRA: search distill with another cache")
    if "distill" in combo and "tgate" in combo:
        return "distill turns guidance off, and tgate caches the guided half: they do not combine"
    exclusive = [name for name in combo if name in EXCLUSIVE]
    others = [name for name in combo if name not in ("steps", "distill", *exclusive)]
    if exclusive and (others or len(exclusive) > 1):
        return (f"{exclusive[0]} combines only with steps (got {combo_name(combo)}): diffusers "
                "runs one cache per model")
    return None


def max_speedup(setting: Mapping, model_steps: int, strength: float | None = None) -> float | None:
    """The most a setting can speed the pipeline up by the computation it skips (the product of
    each family's bound), or None when a family in it has no such bound (ToMe, the caches whose
    skips depend on the images). `strength`: an image-to-image call's (fewer steps then drop a
    share of the steps that denoise)."""
    bound = 1.0
    for name, params in normalize_setting(setting).items():
        family_bound = getattr(REGISTRY[name], "max_speedup", None)
        if family_bound is None:
            return None
        bound *= family_bound(model_steps, **params, strength=strength)
    return bound


def normalize_setting(setting: Mapping) -> dict[str, dict]:
    """Accept a nested dict or a flat {'tome.ratio': 0.5} dict; check names, types and ranges."""
    nested: dict[str, dict] = {}
    for key, value in setting.items():
        if isinstance(value, Mapping):
            nested.setdefault(key, {}).update(value)
        elif "." in key:
            accelerator, _, param = key.partition(".")
            nested.setdefault(accelerator, {})[param] = value
        else:
            raise ValueError(f"setting key {key!r} is neither 'accelerator.param' nor a table")
    result: dict[str, dict] = {}
    for name in ORDER:
        if name not in nested:
            continue
        params = params_of(name)
        values = {}
        for param_name, value in nested.pop(name).items():
            if param_name not in params:
                raise ValueError(
                    f"unknown parameter {name}.{param_name} (allowed: {', '.join(params)})"
                )
            problem = params[param_name].check(value)
            if problem:
                raise ValueError(f"{name}.{param_name}={value!r} {problem}")
            values[param_name] = params[param_name].kind(value)
        result[name] = values
    if nested:
        raise ValueError(f"unknown accelerator {next(iter(nested))!r} (allowed: {', '.join(ORDER)})")
    problem = combo_problem(list(result))
    if problem:
        raise ValueError(problem)
    return result


def step_budget(setting: Mapping[str, dict], model_steps: int, strength: float | None = None,
                rounds_up: bool = False) -> int:
    """The denoising steps the setting runs: its own `steps.num_inference_steps`, else
    model.steps, at an image-to-image `strength` their share (`denoised_steps`)."""
    return denoised_steps(setting.get("steps", {}).get("num_inference_steps", model_steps), strength,
                          rounds_up)


def _step_counted(setting: Mapping[str, dict]):
    """(family, parameter, value) of every parameter the setting gives that counts steps."""
    for name, values in setting.items():
        for param, declared in params_of(name).items():
            if declared.counts_steps and values.get(param) is not None:
                yield name, param, values[param]


def step_problems(setting: Mapping[str, dict], model_steps: int,
                  strength: float | None = None, rounds_up: bool = False) -> list[str]:
    """Step-counted parameters that do not fit in the setting's own (denoising) step count."""
    budget = step_budget(setting, model_steps, strength, rounds_up)
    where = "steps.num_inference_steps" if "steps" in setting else "model.steps"
    if strength is not None:
        where += f" at strength {strength}"
    problems = []
    if step_budget(setting, model_steps) > model_steps:
        problems.append(f"steps.num_inference_steps={step_budget(setting, model_steps)} must be "
                        f"<= model.steps={model_steps} (fewer steps than the baseline)")
    problems += [f"{name}.{param}={value} must be <= {budget} ({where})"
                 for name, param, value in _step_counted(setting) if value > budget]
    for name, values in setting.items():  # a family that runs only at some step counts
        tell = getattr(REGISTRY[name], "step_problem", None) if name in REGISTRY else None
        why = tell(values, budget) if tell is not None else None
        if why:
            problems.append(f"{why} ({where})")
    return problems


def fit_to_steps(setting: dict[str, dict], model_steps: int,
                 strength: float | None = None, rounds_up: bool = False) -> dict[str, dict]:
    """Clip step-counted parameters to the setting's (denoising) step count (a sampled gate_step
    of 15 with 10 steps means "gate at the last step")."""
    budget = min(step_budget(setting, model_steps, strength, rounds_up),
                 denoised_steps(model_steps, strength, rounds_up))
    fitted = {name: dict(values) for name, values in setting.items()}
    for name, param, value in _step_counted(setting):
        fitted[name][param] = min(value, budget)
    return fitted
