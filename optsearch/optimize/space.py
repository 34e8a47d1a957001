"""The search space: how a trial samples one setting from the spec's combos and ranges."""

from __future__ import annotations

import optuna

from optsearch.accelerators import combo_name, fit_to_steps, params_of
from optsearch.study_spec import StudySpec


def suggest_setting(trial: optuna.Trial, spec: StudySpec, auto: dict | None = None) -> dict[str, dict]:
    """Sample one setting: the combo (a categorical when several), then its parameters (an
    "auto" range from `auto`, what the worker calibrated on its device)."""
    combos = {combo_name(c): c for c in spec.search.combos}
    combo = combos[trial.suggest_categorical("combo", list(combos))] if len(combos) > 1 \
        else next(iter(combos.values()))
    setting: dict[str, dict] = {}
    for accelerator in combo:
        values = {}
        for param, declared in params_of(accelerator).items():
            bounds = spec.param_range(accelerator, param, auto)
            name = f"{accelerator}.{param}"
            if len(bounds) == 1:
                values[param] = bounds[0]
            elif spec.search.sampler == "grid":
                values[param] = trial.suggest_categorical(name, spec.grid_values(accelerator, param))
            elif declared.kind is int:
                values[param] = trial.suggest_int(name, bounds[0], bounds[1], step=bounds[2] or 1)
            else:
                values[param] = trial.suggest_float(name, bounds[0], bounds[1], step=bounds[2])
        setting[accelerator] = values
    return fit_to_steps(setting, spec.model.steps)
