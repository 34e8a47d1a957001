"""The search space: how a trial samples one setting from the spec's combos and ranges."""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Mapping

import optuna

from optsearch.accelerators import (
    REGISTRY,
    CalibratedRange,
    combo_name,
    denoised_steps,
    fit_to_steps,
    params_of,
)
from optsearch.accelerators.distill import lora_key
from optsearch.study_spec import StudySpec

logger = logging.getLogger(__name__)


def suggest_setting(trial: optuna.Trial, spec: StudySpec, auto: dict | None = None) -> dict[str, dict]:
    """Sample one setting: the combo (a categorical when several), then its parameters, but
    those a family says do nothing given the values drawn before them (`inactive`: Optuna's
    conditional space) (an
    "auto" range from `auto`, what the worker calibrated on its device; a `CalibratedRange` that
    moves with a parameter drawn before it, e.g. DBCache's threshold with Fn and with the step
    count `steps` drew, the range of the values drawn)."""
    combos = {combo_name(c): c for c in spec.search.combos}
    combo = combos[trial.suggest_categorical("combo", list(combos))] if len(combos) > 1 \
        else next(iter(combos.values()))
    recipe = _draw_recipe(trial, spec, combo)
    setting: dict[str, dict] = {}
    for accelerator in combo:
        values = {}
        inactive = getattr(REGISTRY[accelerator], "inactive", lambda _values: set())
        for param, declared in params_of(accelerator).items():
            if param in inactive(values):  # does nothing given the values drawn: not drawn
                continue
            bounds = spec.param_range(accelerator, param, auto, combo, recipe)
            name = spec.param_name(accelerator, param, combo)  # steps beside distill: the LoRA's
            calibrated = (auto or {}).get(name)
            if len(bounds) > 1 and isinstance(calibrated, CalibratedRange):  # the range of the
                bounds = (*calibrated.for_setting(  # drawn Fn, at the drawn steps' denoising,
                    values, _denoising(setting, spec.model),  # on the distilled model drawn
                    lora_key(setting["distill"]) if "distill" in setting else None), None)
            released = _release_outside(trial, name, bounds) if name in (auto or {}) else None
            if len(bounds) == 1:
                values[param] = bounds[0]
            elif spec.search.sampler == "grid" or declared.named:
                values[param] = trial.suggest_categorical(name, spec.grid_values(accelerator, param,
                                                                                 combo))
            elif declared.kind is int:
                values[param] = trial.suggest_int(name, bounds[0], bounds[1], step=bounds[2] or 1)
            else:
                values[param] = trial.suggest_float(name, bounds[0], bounds[1], step=bounds[2])
            if released is not None:
                _fix_sampled(trial, name, released, values[param], bounds)
        setting[accelerator] = values
    return fit_to_steps(setting, spec.model.steps, spec.model.strength, spec.model.rounds_up)


def _draw_recipe(trial: optuna.Trial, spec: StudySpec, combo: tuple) -> dict:
    """The step-distilled LoRA's recipe a trial runs (its file, steps and scheduler together),
    drawn whole by name ("distill.recipe"); {} where the combo draws none."""
    recipes = spec.named_recipes(combo)
    if len(recipes) == 1:
        return next(iter(recipes.values()))
    return recipes[trial.suggest_categorical("distill.recipe", list(recipes))]


def _denoising(setting: dict, model) -> int | None:
    """The steps a setting's own step count (None: the model's) denoises at the model's strength."""
    steps = setting.get("steps", {}).get("num_inference_steps")
    return None if steps is None else denoised_steps(steps, model.strength, model.rounds_up)


def _release_outside(trial: optuna.Trial, name: str, bounds: tuple):
    """An enqueued value of an "auto" parameter outside the range calibrated on this device: let
    the sampler choose it within the range instead, and return it. A warm start's published
    threshold is a real model's (FLUX's 0.12); on another model or device it may skip nothing,
    or everything, and the trial would measure nothing. (Optuna keeps enqueued values in the
    trial's private `_fixed_params`, and would otherwise use one outside its range with a
    warning.)"""
    fixed = getattr(trial, "_fixed_params", {})
    value = fixed.get(name)
    if value is None or len(bounds) == 1 or bounds[0] <= value <= bounds[1]:
        return None
    del fixed[name]
    return value


def _fix_sampled(trial: optuna.Trial, name: str, released, chosen, bounds: tuple) -> None:
    """Keep the value sampled in place of a released one as the trial's enqueued value (a failed
    trial is re-queued with it, not with the value outside the range), and say so."""
    fixed = trial._fixed_params
    fixed[name] = chosen
    trial.storage.set_trial_system_attr(trial._trial_id, "fixed_params", fixed)
    trial.set_user_attr("outside_calibrated_range", {name: released})
    logger.info("trial %d: %s = %s (enqueued) lies outside the range calibrated on this device "
                "[%s, %s]; sampled %s within it", trial.number, name, released, bounds[0],
                bounds[1], chosen)


MOST_SETTINGS_COUNTED = 200_000  # a family's settings enumerated at most to count computations


def computations(spec: StudySpec, calibrations: Mapping[str, dict]) -> int | None:
    """How many distinct computations the spec's space holds on a device whose calibrations are
    `calibrations` (ToMe's token counts, PAB's timesteps): settings a family tells apart only by
    what they compute count once (`computation`); a combo multiplies its families' counts. None
    when some family cannot tell (a continuous parameter, an "auto" range, a space too large to
    enumerate, or fewer steps beside another family: its computations change with the count)."""
    total = 0
    for combo in spec.search.combos:
        if "steps" in combo and len(combo) > 1:
            return None
        product = 1
        for family in combo:
            count = _family_computations(spec, family, calibrations.get(family) or {})
            if count is None:
                return None
            product *= count
        total += product
    return total


def trials_possible(spec: StudySpec, count: int | None) -> int:
    """The trials a search can measure on a device whose space holds `count` distinct
    computations (`computations`; None: not told): n_trials, or the space's settings or its
    computations where fewer (what an estimate counts)."""
    return min(spec.trials_possible(), count or spec.search.n_trials)


def _family_computations(spec: StudySpec, family: str, calibration: Mapping) -> int | None:
    """The distinct computations of one family's searched values (its settings, each keyed by
    what it computes where the family can tell)."""
    axes = []
    for param, declared in params_of(family).items():
        if spec.space_value(family, param) == "auto":
            return None
        bounds = spec.param_range(family, param)
        if len(bounds) == 1 or declared.named or bounds[2]:  # fixed, named or stepped
            values = spec.grid_values(family, param)
        elif declared.kind is int:  # the sampler draws every integer of the range
            values = list(range(int(bounds[0]), int(bounds[1]) + 1))
        else:  # continuous: only a family that tells its computations apart can count them
            told = getattr(REGISTRY[family], "telling_values", None)
            values = told(param, bounds[0], bounds[1], calibration) if told else None
            if values is None:
                return None
        axes.append([(param, value) for value in values])
    if math.prod(len(axis) for axis in axes) > MOST_SETTINGS_COUNTED:
        return None
    tell = getattr(REGISTRY[family], "computation", None)
    keys = set()
    for drawn in itertools.product(*axes):
        params = dict(drawn)
        told = tell(params, spec.model.denoising_steps, calibration) if tell else None
        keys.add(json.dumps(params if told is None else told, sort_keys=True))
    return len(keys)

