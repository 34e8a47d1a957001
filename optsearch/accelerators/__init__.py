"""The accelerator registry, which families apply to which pipelines, and applying a setting.

A *setting* is a nested dict: ``{"deepcache": {"cache_interval": 3}, "tome": {"ratio": 0.5}}``.
Families apply in the fixed `ORDER` and restore in reverse: T-GATE drives an already-enabled
DeepCache helper itself, so DeepCache comes first; `steps` only lowers each call's step count.

Which families apply depends on the pipeline's denoiser (`KINDS`):
- "unet" (SD 1.x/2.x, SDXL): deepcache, tome, tgate, pab; `"any"` = the original four combos.
- "transformer" (FLUX and other diffusion transformers): the diffusers caches fbcache,
  taylorseer, pab, magcache, fastercache (on transformers with diffusers' `enable_cache`) and
  cache-dit's dbcache (on pipelines cache-dit supports), one at a time; `"any"` = each alone
  but fastercache, and `steps` alone as the reference.
- "video" (a transformer pipeline that returns frames: Wan, CogVideoX, HunyuanVideo): the same
  caches; `"any"` = steps, pab, fastercache, fbcache, magcache and dbcache (TaylorSeer's default
  attention names do not match Wan's blocks: measured inert there).
`steps` applies everywhere and combines with every family; a cache (pab, fbcache, taylorseer,
magcache, dbcache) combines with nothing but `steps` (diffusers allows one cache per model, and
on a UNet PAB's attention hooks would fight T-GATE's and DeepCache's patches).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType

from optsearch.accelerators import (
    dbcache,
    deepcache,
    fastercache,
    fbcache,
    magcache,
    pab,
    steps,
    taylorseer,
    tgate,
    tome,
)
from optsearch.accelerators.base import CalibratedRange, Param
from optsearch.accelerators.hooks import (
    attention_of,
    denoiser,
    dtype_of,
    execution_device,
    native_size,
    not_a_pipeline,
    offload_of,
    quantization_of,
    scheduler_class_name,
    scheduler_of,
)

REGISTRY: dict[str, ModuleType] = {
    m.NAME: m for m in (steps, deepcache, tome, tgate, pab, fastercache, fbcache, taylorseer, magcache,
                        dbcache)
}
ORDER = tuple(REGISTRY)
KINDS = ("unet", "transformer", "video")
EXCLUSIVE = ("pab", "fastercache", "fbcache", "taylorseer", "magcache", "dbcache")  # combine only with steps
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
    "video": (("steps",), ("pab",), ("fastercache",), ("fbcache",), ("magcache",), ("dbcache",)),
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


def call_parameters(pipe) -> Mapping[str, inspect.Parameter]:
    """The arguments the pipeline class's `__call__` takes, with their defaults."""
    return inspect.signature(type(pipe).__call__).parameters


def pipeline_kind(pipe) -> str:
    """'unet', 'transformer' or 'video' (a transformer pipeline whose call takes `num_frames`):
    which families the pipeline's denoiser can take, and whether it returns frames."""
    if getattr(pipe, "unet", None) is not None:
        return "unet"
    return "video" if "num_frames" in call_parameters(pipe) else "transformer"


def combo_problem(combo: Sequence[str], kind: str | None = None) -> str | None:
    """Why the families of `combo` cannot run together (on a `kind` pipeline), or None."""
    if kind is not None:
        foreign = [name for name in combo if kind not in REGISTRY[name].APPLIES_TO]
        if foreign:
            return (f"{foreign[0]} does not apply to this model ({kind} pipeline; families that "
                    f"do: {', '.join(applicable(kind))})")
    exclusive = [name for name in combo if name in EXCLUSIVE]
    others = [name for name in combo if name not in ("steps", *exclusive)]
    if exclusive and (others or len(exclusive) > 1):
        return (f"{exclusive[0]} combines only with steps (got {combo_name(combo)}): diffusers "
                "runs one cache per model")
    return None


def max_speedup(setting: Mapping, model_steps: int) -> float | None:
    """The most a setting can speed the pipeline up by the computation it skips (the product of
    each family's bound), or None when a family in it has no such bound (ToMe, the caches whose
    skips depend on the images)."""
    bound = 1.0
    for name, params in normalize_setting(setting).items():
        family_bound = getattr(REGISTRY[name], "max_speedup", None)
        if family_bound is None:
            return None
        bound *= family_bound(model_steps, **params)
    return bound


def pipeline_problem(combo: Sequence[str], pipe) -> str | None:
    """Why a family of `combo` cannot run on this loaded pipeline (beyond its kind), or None."""
    for name in combo:
        check = getattr(REGISTRY[name], "problem_with", None)
        if check is not None and (problem := check(pipe)):
            return problem
    return None


def enabled_already(pipe) -> str | None:
    """An accelerator the pipeline came with (a diffusers cache, cache-dit, ToMe, DeepCache),
    named; None for a plain one (or one whose accelerator was disabled again). A baseline must be
    the plain pipeline, and a setting applied on top of another cache would stack two."""
    model = denoiser(pipe)
    if getattr(model, "is_cache_enabled", False):
        return "a diffusers cache (enable_cache)"
    if getattr(model, "_is_cached", False):
        return "cache-dit (enable_cache)"
    if any(type(module).__name__ == "ToMeBlock" for module in model.modules()):  # tomesd's
        return "ToMe (tomesd.apply_patch)"  # patched blocks (remove_patch leaves _tome_info)
    forward = vars(model).get("forward")  # DeepCache wraps the UNet's forward while enabled
    if getattr(forward, "__module__", "").startswith("DeepCache"):
        return "DeepCache (DeepCacheSDHelper.enable)"
    return None


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


def _step_budget(setting: Mapping[str, dict], model_steps: int) -> int:
    """The steps the setting runs: its own `steps.num_inference_steps`, else model.steps."""
    return setting.get("steps", {}).get("num_inference_steps", model_steps)


def _step_counted(setting: Mapping[str, dict]):
    """(family, parameter, value) of every parameter the setting gives that counts steps."""
    for name, values in setting.items():
        for param, declared in params_of(name).items():
            if declared.counts_steps and values.get(param) is not None:
                yield name, param, values[param]


def step_problems(setting: Mapping[str, dict], model_steps: int) -> list[str]:
    """Step-counted parameters that do not fit in the setting's own step count."""
    budget = _step_budget(setting, model_steps)
    where = "steps.num_inference_steps" if "steps" in setting else "model.steps"
    problems = []
    if budget > model_steps:
        problems.append(f"steps.num_inference_steps={budget} must be <= model.steps={model_steps} "
                        "(fewer steps than the baseline)")
    problems += [f"{name}.{param}={value} must be <= {budget} ({where})"
                 for name, param, value in _step_counted(setting) if value > budget]
    return problems


def fit_to_steps(setting: dict[str, dict], model_steps: int) -> dict[str, dict]:
    """Clip step-counted parameters to the setting's step count (a sampled gate_step of 15 with
    10 steps means "gate at the last step")."""
    budget = min(_step_budget(setting, model_steps), model_steps)
    fitted = {name: dict(values) for name, values in setting.items()}
    for name, param, value in _step_counted(setting):
        fitted[name][param] = min(value, budget)
    return fitted


def canonical_setting(setting: Mapping, model_steps: int, calibration: Mapping[str, dict]) -> dict:
    """The setting as the computation it makes: as given, except where a family tells from its
    calibration alone which steps it skips (MagCache, from its ratios: `skipped`); there those
    steps stand for its parameters, so two thresholds that skip the same steps are one
    computation (the same images, bit for bit) and need one measurement."""
    nested = normalize_setting(setting)
    canonical: dict[str, dict] = {}
    for name, params in nested.items():
        tell = getattr(REGISTRY[name], "skipped", None)
        skips = tell(params, _step_budget(nested, model_steps), calibration.get(name) or {}) \
            if tell is not None else None
        canonical[name] = params if skips is None else {"skipped_steps": skips}
    return canonical


class AppliedSetting:
    """A setting applied to a pipeline. Call it like the pipeline; `restore()` undoes everything.

    Also a context manager: ``with optsearch.apply(pipe, params) as run: images = run(prompts)``.
    `calibration` holds per-model data a family needs (MagCache's `mag_ratios`).
    """

    def __init__(self, pipe, setting: Mapping, calibration: Mapping[str, dict] | None = None,
                 on_call: Callable[[object, tuple, dict], None] | None = None):
        """`on_call(pipe, args, kwargs)` hears of each call first (`optsearch.apply` of an export:
        the deployment-context check)."""
        self.pipe = pipe
        self.on_call = on_call
        self.setting = normalize_setting(setting)
        self.kind = pipeline_kind(pipe)
        problem = combo_problem(list(self.setting), self.kind)
        enabled = enabled_already(pipe) if self.setting else None
        if enabled:
            problem = (f"the pipeline already has {enabled}: a setting applies to the plain "
                       "pipeline (disable that first)")
        if problem:
            raise ValueError(problem)
        self.calibration = dict(calibration or {})
        self._patches: list = []
        self._tome = self._tgate = None
        try:
            self._apply()
        except BaseException:
            self.restore()
            raise

    def _apply(self) -> None:
        helper = None
        for name, params in self.setting.items():
            if name == "deepcache":
                patch = deepcache.apply(self.pipe, **params)
                helper = patch.helper
            elif name == "tgate":
                patch = self._tgate = tgate.apply(self.pipe, deepcache_helper=helper, **params)
            else:
                patch = REGISTRY[name].apply(self.pipe, **params, **self.calibration.get(name, {}))
                if name == "tome":
                    self._tome = patch
            self._patches.append(patch)

    @property
    def combo(self) -> str:
        return combo_name(self.setting)

    @property
    def warmup_steps(self) -> int:
        """Steps that take a call through every code path of the applied accelerators."""
        return max((REGISTRY[name].warmup_steps(**params) for name, params in self.setting.items()),
                   default=0)

    def computed_fraction(self) -> float | None:
        """The share of a full run's denoiser computation the last call ran: the product of what
        each family reports (steps: the steps kept; dbcache: the blocks computed); None when a
        family in the setting reports nothing."""
        fraction = 1.0
        for patch in self._patches:
            report = getattr(patch, "computed_fraction", None)
            value = report() if report is not None else None
            if value is None:
                return None
            fraction *= value
        return fraction

    def reseed(self, seed: int) -> None:
        """Fix ToMe's random merge pattern for the next call (no-op without ToMe)."""
        if self._tome is not None:
            self._tome.reseed(seed)

    def __call__(self, *args, **kwargs):
        if self.on_call is not None:
            self.on_call(self.pipe, args, kwargs)
        for patch in self._patches:
            if hasattr(patch, "prepare"):
                patch.prepare(kwargs)
        if self._tgate is not None:
            return self._tgate(*args, **kwargs)
        return self.pipe(*args, **kwargs)

    def restore(self) -> None:
        """Put the pipeline back exactly as it was, in reverse order of application."""
        while self._patches:
            self._patches.pop().restore()

    def __enter__(self) -> AppliedSetting:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def apply_setting(pipe, setting: Mapping, calibration: Mapping[str, dict] | None = None
                  ) -> AppliedSetting:
    return AppliedSetting(pipe, setting, calibration)


def calibrate_family(family: str, pipe, run_once: Callable[[int], object], searched: Mapping,
                     step_counts: Sequence[int]) -> dict:
    """A family's "auto" calibration (its module's `calibrate`) with one plain call
    `run_once(steps)` at each of `step_counts`, the model's first: stored as measured there,
    plus "at_steps" {count: its ranges} when trials also run fewer steps (CalibratedRange)."""
    module = REGISTRY[family]
    measured = module.calibrate(pipe, lambda: run_once(step_counts[0]), searched, step_counts[0])
    if not measured or len(step_counts) < 2:
        return measured
    at_steps = {}
    for count in step_counts:
        at_count = measured if count == step_counts[0] else \
            module.calibrate(pipe, lambda count=count: run_once(count), searched, count)
        if at_count:
            at_steps[str(count)] = {key: at_count[key] for key in ("auto", "by") if key in at_count}
    return {**measured, "at_steps": at_steps}


def calibrated_range(family: str, calibration: Mapping, param: str) -> CalibratedRange:
    """The "auto" range of `family.param` in a calibration as stored, with the family's rule for
    each trial's own range where it has one (`range_for`: MagCache's, from its ratios)."""
    return CalibratedRange.stored(calibration, param, getattr(REGISTRY[family], "range_for", None))


def calibration_steps(family: str, model_steps: int, fewest_steps: int | None) -> list[int]:
    """The step counts `calibrate_family` runs: the model's, and the fewest a trial of the family
    runs (`fewest_steps`, when a combo searches it beside `steps`) unless the family's rule gives
    each step count's range from the first calibration alone."""
    if fewest_steps is None or fewest_steps >= model_steps or hasattr(REGISTRY[family], "range_for"):
        return [model_steps]
    return [model_steps, fewest_steps]


def calibration_cost(family: str, searched: Mapping, step_counts: Sequence[int]) -> float:
    """What `calibrate_family` runs, in plain calls at the model's steps (a call of fewer steps
    costs its share): a family's module may say how many runs it makes (`calibration_runs`)."""
    runs = getattr(REGISTRY[family], "calibration_runs", lambda _searched: 1)(searched)
    return runs * sum(count / step_counts[0] for count in step_counts)


__all__ = ["ANY_COMBOS", "COMBOS", "KINDS", "ORDER", "REGISTRY", "AppliedSetting", "CalibratedRange", "Param",
           "applicable", "apply_setting", "attention_of", "calibrate_family", "calibrated_range",
           "calibration_cost", "calibration_steps", "canonical_setting", "combo_name",
           "combo_problem",
           "denoiser", "dtype_of", "execution_device", "fit_to_steps", "native_size",
           "normalize_setting", "not_a_pipeline", "offload_of", "params_of", "pipeline_kind",
           "quantization_of", "scheduler_class_name", "scheduler_of", "step_problems"]
