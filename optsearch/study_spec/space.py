"""The spec's search space: what each combo draws for each parameter, how many settings that
makes, and at which step counts a cache's "auto" range is calibrated. `StudySpec` takes these
from `SearchSpace`, which reads its `space`, `model` and `search` tables."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from optsearch.accelerators import (
    CalibrationCondition,
    calibration_cost,
    calibration_steps,
    params_of,
)
from optsearch.accelerators.distill import LORA_FILES, lora_key, recipe_name


class SearchSpace:
    """The queries of a spec's `[space]` tables, per combo (a mixin of `StudySpec`)."""

    space: dict[str, dict[str, Any]]  # StudySpec's fields these read
    model: Any
    search: Any
    accelerators_used: list[str]

    def param_range(self, accelerator: str, param: str, auto: dict | None = None,
                    combo: tuple = (), recipe: dict | None = None) -> tuple:
        """(low, high, step or None) for a searched parameter, or (value,) for a fixed one (for a
        parameter with choices, the choices searched), in `combo` (and with a distill `recipe`
        drawn: what it sets). An
        "auto" range is the one calibrated on this device (`auto`, {"family.param": [lo, hi]}),
        else the parameter's default."""
        value = _recipe_value(recipe or {}, accelerator, param)
        if value is None:
            value = self.space_value(accelerator, param, combo)
        if value == "auto":
            value = (auto or {}).get(f"{accelerator}.{param}")
        if value is None:
            counted = self.model.steps if accelerator == "steps" else self.model.denoising_steps
            value = params_of(accelerator)[param].default_range(counted, self.search.model_kind)
        if not isinstance(value, (list, tuple)):
            return (value,)
        if len(value) == 1 or params_of(accelerator)[param].named:  # the choices searched
            return tuple(value)
        return (value[0], value[1], value[2] if len(value) == 3 else None)

    def searched_values(self, accelerator: str) -> dict[str, list]:
        """The values this spec lets each integer parameter of `accelerator` take, and the
        extremes of each float range: what a calibration must hold for every trial."""
        values: dict[str, list] = {}
        for param, declared in params_of(accelerator).items():
            if self.space_value(accelerator, param) == "auto":
                continue
            for recipe in self.recipes((accelerator,)):  # distill: each recipe's too
                bounds = self.param_range(accelerator, param, recipe=recipe)
                if len(bounds) == 1 or declared.named:
                    taken = list(bounds)
                elif declared.kind is int:
                    taken = _integers(bounds)
                else:
                    taken = [bounds[0], bounds[1]]
                kept = values.setdefault(param, [])
                kept += [value for value in taken if value not in kept]
        return values

    def calibration_conditions(self, family: str) -> list[CalibrationCondition]:
        """Each model a family's "auto" range is calibrated on, as its trials run it: the plain
        model where a combo runs the family without distill, and each step-distilled LoRA a combo
        runs it with (a cache's differences on Lightning at 4 steps are not the plain model's),
        each at its step counts (the most its trials run, and the fewest, where a combo with
        `steps` draws fewer: the differences grow with the step size), and with each scheduler
        its recipes swap in."""
        combos = [combo for combo in self.search.combos if family in combo]
        plain = [combo for combo in combos if "distill" not in combo]
        conditions = []
        if plain or not combos:
            fewest = min((min(self.step_counts(combo)) for combo in plain if "steps" in combo),
                         default=None)
            conditions.append(CalibrationCondition(None, None, calibration_steps(
                family, self.model.steps, fewest)))
        per_lora: dict[str, tuple[dict, set[int]]] = {}
        for combo in (combo for combo in combos if "distill" in combo):
            for recipe in self.recipes(combo):
                counts = self._steps_drawn(combo, recipe) if "steps" in combo else {self.model.steps}
                for setting in self.distill_settings([recipe]):
                    for scheduler in self.param_range("distill", "scheduler_config", recipe=recipe):
                        scheduled = {"distill": {**setting["distill"], "scheduler_config": scheduler}}
                        key = lora_key(scheduled["distill"])
                        per_lora.setdefault(key, (scheduled, set()))[1].update(counts)
        conditions += [CalibrationCondition(key, setting, calibration_steps(
            family, max(counts), min(counts))) for key, (setting, counts) in per_lora.items()]
        return conditions

    def fewest_steps(self, family: str | None = None) -> int | None:
        """The fewest steps a combo with `steps` (and with `family`, when given) draws; None
        where no such combo is searched."""
        return min((min(self.step_counts(combo)) for combo in self.search.combos
                    if "steps" in combo and (family is None or family in combo)), default=None)

    def step_counts(self, combo: tuple) -> set[int]:
        """Every step count `combo`'s `steps` may draw (each recipe's, and its range's)."""
        return set().union(*(self._steps_drawn(combo, recipe) for recipe in self.recipes(combo)))

    def _steps_drawn(self, combo: tuple, recipe: dict) -> set[int]:
        """The step counts `combo`'s `steps` may draw with a distill `recipe` ({}: none)."""
        return set(_integers(self.param_range("steps", "num_inference_steps", combo=combo,
                                              recipe=recipe)))

    def recipes(self, combo: tuple = ("distill",)) -> list[dict]:
        """The step-distilled LoRA's recipes `combo` draws whole, by name (`[[space.distill.
        recipes]]`: a LoRA file with its steps and scheduler); [{}] where it draws none (one draw
        of the table's keys)."""
        return (self.space.get("distill", {}).get("recipes") if "distill" in combo else None) or [{}]

    def named_recipes(self, combo: tuple = ("distill",)) -> dict[str, dict]:
        """`recipes(combo)` by the names "distill.recipe" draws ({"": {}} where it draws none)."""
        return {recipe_name(recipe): recipe for recipe in self.recipes(combo)}

    def distilled_steps(self, combo: tuple):
        """The LoRA's own steps (`space.distill.num_inference_steps`) where `combo` runs distill
        and the spec gives them: that combo's `steps` draws these. Else None."""
        return self.space.get("distill", {}).get("num_inference_steps") if "distill" in combo else None

    def param_name(self, accelerator: str, param: str, combo: tuple = ()) -> str:
        """A trial's parameter as Optuna names it, "family.param"; the LoRA's own steps are
        "distill.num_inference_steps", a distribution apart from fewer steps' range."""
        if accelerator == "steps" and self.distilled_steps(combo) is not None:
            return "distill.num_inference_steps"
        return f"{accelerator}.{param}"

    def distill_settings(self, recipes: list[dict] | None = None) -> list[dict]:
        """Each step-distilled LoRA the study searches (each recipe's, or those of `recipes`;
        every file a list of `lora` or `weight_name` names), with the first of what else it
        searches there (none without distill)."""
        if "distill" not in self.accelerators_used:
            return []
        settings = []
        for recipe in recipes or self.recipes():
            searched = {param: self.param_range("distill", param, recipe=recipe)
                        for param in params_of("distill")}
            first = {param: bounds[0] for param, bounds in searched.items()}
            settings += [{"distill": {**first, **dict(zip(LORA_FILES, chosen, strict=True))}}
                         for chosen in itertools.product(*(searched[name] for name in LORA_FILES))]
        return settings

    def calibration_calls(self, pending: Mapping[str, list] | None = None) -> float:
        """The plain calls (in calls at the model's steps) that calibrate the "auto" ranges on
        the models `pending` names ({family: its calibration conditions still to measure};
        default: every model of every family with one): what the estimate adds before the
        first trial."""
        if pending is None:
            pending = {family: self.calibration_conditions(family) for family, _ in self.auto_params()}
        return sum(calibration_cost(family, self.searched_values(family), condition.step_counts,
                                    self.model.steps)
                   for family, conditions in pending.items() for condition in conditions)

    def auto_params(self) -> list[tuple[str, str]]:
        """(family, parameter) of every range the spec leaves to calibration ("auto")."""
        return [(family, param) for family in self.accelerators_used for param in params_of(family)
                if self.space_value(family, param) == "auto"]

    def space_value(self, accelerator: str, param: str, combo: tuple = ()):
        """What the spec gives a parameter in `combo`: its `[space]` entry (steps beside distill:
        the LoRA's, where given); where it gives none, "auto" for
        a threshold (a range measured on the model and device: a fixed default range skipped
        nothing on some models and everything on others), but with the grid sampler, whose grid
        is fixed at creation; else None (the parameter's default range)."""
        distilled = self.distilled_steps(combo) if accelerator == "steps" else None
        value = self.space.get(accelerator, {}).get(param) if distilled is None else distilled
        if value is None and params_of(accelerator)[param].calibrated \
                and self.search.sampler != "grid":
            return "auto"
        return value

    def searched_params(self, accelerator: str, combo: tuple = ()) -> list[str]:
        """The parameters of `accelerator` that this spec searches in `combo` (ranges, not fixed
        values; or fixed, but another in each distill recipe)."""
        searched = []
        for param in params_of(accelerator):
            ranges = {self.param_range(accelerator, param, combo=combo, recipe=recipe)
                      for recipe in self.recipes(combo)}
            if len(ranges) > 1 or len(next(iter(ranges))) > 1:
                searched.append(param)
        return searched

    def space_size(self) -> int | None:
        """How many settings the sampler can draw, at most (parameters a drawn value makes
        inactive, and twins, make fewer); None when a searched parameter is continuous or "auto"."""
        total = 0
        for combo in self.search.combos:
            for recipe in self.recipes(combo):
                size = 1
                for accelerator in combo:
                    for param, declared in params_of(accelerator).items():
                        bounds = () if self.space_value(accelerator, param) == "auto" \
                            else self.param_range(accelerator, param, combo=combo, recipe=recipe)
                        if len(bounds) == 1:
                            continue
                        if not bounds or (declared.kind is float and bounds[2] is None
                                          and self.search.sampler != "grid"):
                            return None
                        size *= len(self.grid_values(accelerator, param, combo)) \
                            if declared.named or self.search.sampler == "grid" \
                            else int(round((bounds[1] - bounds[0]) / (bounds[2] or 1) + 1e-9)) + 1
                total += size
        return total

    def trials_possible(self) -> int:
        """The trials a search can measure: n_trials, or the space's size where that is smaller
        (what an estimate counts)."""
        return min(self.search.n_trials, self.space_size() or self.search.n_trials)

    def grid_values(self, accelerator: str, param: str, combo: tuple = ()) -> list:
        """Every value the exhaustive grid tries for a parameter in `combo` (step: given, else
        its default)."""
        bounds = self.param_range(accelerator, param, combo=combo)
        if len(bounds) == 1 or params_of(accelerator)[param].named:
            return list(bounds)
        low, high, step = bounds
        step = step or params_of(accelerator)[param].grid_step
        count = int(round((high - low) / step + 1e-9)) + 1
        values = [low + i * step for i in range(count)]
        if params_of(accelerator)[param].kind is int:
            return [int(v) for v in values]
        return [round(v, 10) for v in values]


def _integers(bounds: tuple) -> list[int]:
    """Every integer a fixed value (value,) or a range (low, high, step or None) takes."""
    if len(bounds) == 1:
        return [int(bounds[0])]
    return list(range(int(bounds[0]), int(bounds[1]) + 1, int(bounds[2] or 1)))


def _recipe_value(recipe: dict, accelerator: str, param: str):
    """What a distill recipe sets: its distill keys, and the steps `steps` runs with it."""
    if accelerator == "distill" or (accelerator, param) == ("steps", "num_inference_steps"):
        return recipe.get(param)
    return None
