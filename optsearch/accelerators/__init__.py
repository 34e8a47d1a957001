"""Accelerators: what a loaded pipeline can take, and applying a setting to it (`AppliedSetting`).

The families and what a setting is live in registry.py; what families measure on the device
("auto" ranges, MagCache's skips) in calibration.py; each family in its own module. A *setting*
is a nested dict: ``{"deepcache": {"cache_interval": 3}, "tome": {"ratio": 0.5}}``. Families
apply in the fixed `ORDER` and restore in reverse: T-GATE drives an already-enabled DeepCache
helper itself, so DeepCache comes first; `steps` only lowers each call's step count.

Which families apply depends on the pipeline's denoiser (`KINDS`):
- "unet" (SD 1.x/2.x, SDXL): deepcache, tome, tgate, pab; `"any"` = the original four combos.
- "transformer" (FLUX and other diffusion transformers): the diffusers caches fbcache,
  taylorseer, pab, magcache, fastercache (on transformers with diffusers' `enable_cache`) and
  cache-dit's dbcache (on pipelines cache-dit supports), one at a time; `"any"` = each alone
  but fastercache, and `steps` alone as the reference.
- "video" (a transformer pipeline that returns frames: Wan, CogVideoX, HunyuanVideo): the same
  caches; `"any"` = steps, pab, fastercache, fbcache, taylorseer, magcache and dbcache (TaylorSeer
  in its lite mode there: its default attention names do not match Wan's blocks).
- "video" also takes seacache where diffusers has its indicator (Wan text-to-video, Cosmos 3),
  named in the spec (not in `"any"`: on other video pipelines it would run every step in full).
`steps` applies everywhere and combines with every family; a cache (pab, fbcache, taylorseer,
magcache, dbcache) combines with nothing but `steps` (diffusers allows one cache per model, and
on a UNet PAB's attention hooks would fight T-GATE's and DeepCache's patches).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager

from optsearch.accelerators import deepcache, tgate
from optsearch.accelerators.base import CalibratedRange, Param
from optsearch.accelerators.calibration import (
    CalibrationCondition,
    calibrate_family,
    calibrated_range,
    calibration_cost,
    calibration_steps,
    calibration_used,
    canonical_setting,
    missing_conditions,
    same_computation_why,
)
from optsearch.accelerators.hooks import (
    attention_of,
    call_argument,
    call_parameters,
    call_steps,
    denoised_steps,
    denoiser,
    denoisers,
    dtype_of,
    execution_device,
    native_size,
    not_a_pipeline,
    offload_of,
    pipeline_kind,
    quantization_of,
    scheduler_class_name,
    scheduler_of,
)
from optsearch.accelerators.registry import (
    ANY_COMBOS,
    COMBOS,
    KINDS,
    ORDER,
    REGISTRY,
    applicable,
    combo_name,
    combo_problem,
    fit_to_steps,
    max_speedup,
    normalize_setting,
    params_of,
    step_problems,
)


def pipeline_problem(combo: Sequence[str], pipe,
                     values: Mapping[str, Mapping] | None = None) -> str | None:
    """Why a family of `combo` cannot run on this loaded pipeline (beyond its kind), or None.
    `values`: each family's parameter values (a setting's, or the lists a study searches)."""
    for name in combo:
        check = getattr(REGISTRY[name], "problem_with", None)
        if check is not None and (problem := check(pipe, (values or {}).get(name))):
            return problem
    return None


def call_problem(combo: Sequence[str], pipe, call_kwargs: Mapping) -> str | None:
    """Why a family of `combo` cannot run on this pipeline called with `call_kwargs` (what
    decides its guidance), or None: told at load from the spec's call, and again at each call."""
    for name in combo:
        check = getattr(REGISTRY[name], "call_problem", None)
        if check is not None and (problem := check(pipe, call_kwargs)):
            return problem
    return None


def enabled_already(pipe) -> str | None:
    """An accelerator the pipeline came with (a diffusers cache, cache-dit, ToMe, DeepCache),
    named; None for a plain one (or one whose accelerator was disabled again). A baseline must be
    the plain pipeline, and a setting applied on top of another cache would stack two."""
    model = denoiser(pipe)
    if any(getattr(expert, "is_cache_enabled", False) for expert in denoisers(pipe)):
        return "a diffusers cache (enable_cache)"
    if getattr(model, "_is_cached", False):
        return "cache-dit (enable_cache)"
    if any(type(module).__name__ == "ToMeBlock" for module in model.modules()):  # tomesd's
        return "ToMe (tomesd.apply_patch)"  # patched blocks (remove_patch leaves _tome_info)
    forward = vars(model).get("forward")  # DeepCache wraps the UNet's forward while enabled
    if getattr(forward, "__module__", "").startswith("DeepCache"):
        return "DeepCache (DeepCacheSDHelper.enable)"
    return None


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
        problem = (combo_problem(list(self.setting), self.kind)
                   or pipeline_problem(list(self.setting), pipe, self.setting))
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

    def ran_with(self) -> dict[str, dict]:
        """What each family's last call ran with beyond the setting, that a deployment must set
        too (DBCache: cache-dit told the calls ran no separate guidance)."""
        return {name: told for name, patch in zip(self.setting, self._patches, strict=False)
                if (told := getattr(patch, "ran_with", dict)())}

    def reseed(self, seed: int) -> None:
        """Fix ToMe's random merge pattern for the next call (no-op without ToMe)."""
        if self._tome is not None:
            self._tome.reseed(seed)

    def prepared(self, call_kwargs: Mapping) -> dict:
        """The arguments a call given `call_kwargs` runs with under the setting (each family's
        `prepare`: fewer steps, guidance off)."""
        kwargs = dict(call_kwargs)
        for patch in self._patches:
            if hasattr(patch, "prepare"):
                patch.prepare(kwargs)
        return kwargs

    def __call__(self, *args, **kwargs):
        if self.on_call is not None:
            self.on_call(self.pipe, args, kwargs)
        kwargs = self.prepared(kwargs)
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


def calibrate_under_each(family: str, pipe, run_once: Callable[[int, AppliedSetting | None], object],
                         searched: Mapping, conditions: Sequence[CalibrationCondition],
                         call_kwargs: Mapping, known: Mapping | None = None) -> dict:
    """A family's "auto" calibration on each model its trials run it on (`conditions`, the
    spec's `calibration_conditions`) that `known` (what is stored) lacks: the first's at the
    top, as `calibrate_family` returns it, and each step-distilled LoRA's under "under" {its
    files: its calibration}, so that a Lightning trial samples the range its distilled model
    gives. `run_once(steps, under)`: one call of `steps` steps through the applied LoRA (None:
    the plain pipeline)."""
    measured = dict(known or {})
    for condition in missing_conditions(conditions, measured):
        with _calibrating_under(pipe, condition.setting, call_kwargs) as (under, call):
            one = calibrate_family(family, pipe, lambda steps, under=under: run_once(steps, under),
                                   searched, condition.step_counts, call)
        if not one:
            continue
        if "auto" not in measured:
            measured.update(one)
        if condition.lora is not None:
            measured["under"] = {**measured.get("under", {}), condition.lora: one}
    return measured


@contextmanager
def _calibrating_under(pipe, setting: Mapping | None, call_kwargs: Mapping):
    """What a calibration runs under: `setting` applied for its duration (a step-distilled LoRA
    its trials run with; None: the plain pipeline), and the call arguments its calls take
    there (guidance off). Yields (the applied setting or None, those arguments)."""
    if not setting:
        yield None, dict(call_kwargs)
        return
    with AppliedSetting(pipe, setting) as under:
        yield under, under.prepared(call_kwargs)


__all__ = ["ANY_COMBOS", "COMBOS", "KINDS", "ORDER", "REGISTRY", "AppliedSetting", "CalibratedRange",
           "CalibrationCondition", "Param", "applicable", "apply_setting", "attention_of",
           "calibrate_family", "calibrate_under_each",
           "calibrated_range", "calibration_cost", "calibration_steps", "calibration_used",
           "call_argument", "call_parameters", "call_problem", "call_steps", "canonical_setting",
           "combo_name", "combo_problem", "denoised_steps", "denoiser", "denoisers",
           "dtype_of", "enabled_already", "execution_device", "fit_to_steps", "max_speedup",
           "native_size", "normalize_setting", "not_a_pipeline", "offload_of", "params_of",
           "pipeline_kind", "pipeline_problem", "quantization_of", "same_computation_why",
           "scheduler_class_name", "scheduler_of", "step_problems"]
