"""Warm starts: settings worth measuring first, enqueued when a study is created.

- "published": the main operating points the accelerators' papers and docs report (DeepCache N=3
  and N=5 at branch 0, ToMe ratio 0.5, T-GATE gate_step 10; for diffusers' caches the points their
  docs, defaults and authors give for FLUX; cache-dit's DBCache presets) and their combinations,
  for each combo of the study whose ranges contain them (snapped to a range's step); parameters
  a paper does not name take the library's default, moved into the space. With `steps` they run
  at the full step count; `steps` alone has no published point.
- "study:NAME": the best feasible settings of another study in the same storage (its top three and
  each combo's best), clipped to this study's space.

Enqueued settings are ordinary trials: measured once, deduplicated, counted in n_trials.
"""

from __future__ import annotations

import inspect
import itertools
import logging

import optuna

from optsearch.accelerators import REGISTRY, combo_name, params_of
from optsearch.errors import UsageError
from optsearch.optimize.objectives import ranked
from optsearch.optimize.study import load_study
from optsearch.study_spec import StudySpec

logger = logging.getLogger(__name__)

PUBLISHED: dict[str, list[dict]] = {
    "deepcache": [{"cache_interval": 3, "cache_branch_id": 0},  # DeepCache paper, Table 1
                  {"cache_interval": 5, "cache_branch_id": 0}],
    "tome": [{"ratio": 0.5}],  # ToMe for SD, the paper's main setting
    "tgate": [{"gate_step": 10}],  # T-GATE, SD 1.5 with 25 steps
    # diffusers' caches: the operating points their docs and defaults give for FLUX
    "fbcache": [{"threshold": 0.12}],  # nunchaku's FLUX default; "above 0.12 loses quality"
    "taylorseer": [{"cache_interval": 5, "disable_cache_before_step": 3, "max_order": 1}],
    "pab": [{"spatial_attention_block_skip_range": 2, "timestep_skip_low": 100,
             "timestep_skip_high": 800}],  # diffusers' PAB docs example
    # diffusers' FasterCache docs example (CogVideoX); TeaCache's and EasyCache's thresholds
    # measure other quantities and map onto no family here
    "fastercache": [{"spatial_attention_block_skip_range": 2, "timestep_skip_high": 681,
                     "unconditional_batch_skip_range": 5}],
    "magcache": [{"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},  # paper default
                 {"threshold": 0.24, "max_skip_steps": 5, "retention_ratio": 0.1}],  # its FLUX 2.8x
    "seacache": [{"threshold": 0.25, "residual_order": 1, "max_consecutive_cached": 2,
                  "retention_steps": 1}],  # diffusers' SeaCacheConfig defaults
    # cache-dit's DBCache: its README's FLUX points (F8B0 its default, F1B0, F1B0 + TaylorSeer)
    "dbcache": [{"Fn_compute_blocks": 8, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08,
                 "max_warmup_steps": 8},
                {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08,
                 "max_warmup_steps": 8},
                {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.12,
                 "max_warmup_steps": 8, "taylorseer_order": 1}],
}


def _published_points(combo: tuple[str, ...], model_steps: int) -> list[dict[str, dict]]:
    """The published points of a combo's families; `steps` runs them at the model's full step
    count (no paper publishes "fewer steps", so a combo of steps alone has none), and a combo
    with a step-distilled LoRA has none (the caches' points were published at full steps)."""
    families = [name for name in combo if name != "steps"]
    if not families or "distill" in families:
        return []
    points = []
    for chosen in itertools.product(*(PUBLISHED[name] for name in families)):
        setting = {name: dict(p) for name, p in zip(families, chosen, strict=True)}
        if "steps" in combo:
            setting = {"steps": {"num_inference_steps": model_steps}, **setting}
        points.append(setting)
    return points


def published_settings(spec: StudySpec) -> list[dict[str, dict]]:
    """Every combination of published points over the study's combos (inside its space or not)."""
    return [setting for combo in spec.search.combos
            for setting in _published_points(combo, spec.model.steps)]


def _library_default(accelerator: str, param: str):
    return inspect.signature(REGISTRY[accelerator].apply).parameters[param].default


def trial_params(spec: StudySpec, setting: dict[str, dict], clip: bool) -> dict | None:
    """The Optuna params that make a trial measure `setting`; None when it lies outside the space
    (with `clip`, values are moved into the space instead)."""
    combos = [combo_name(c) for c in spec.search.combos]
    combo = combo_name(setting)
    if combo not in combos:
        return None
    params: dict = {"combo": combo} if len(combos) > 1 else {}
    for accelerator in setting:
        for param in params_of(accelerator):
            bounds = spec.param_range(accelerator, param)
            if len(bounds) == 1:
                continue  # fixed in this study: nothing to enqueue
            kind = params_of(accelerator)[param].kind
            if params_of(accelerator)[param].named:  # a named value: one of those searched
                named = param in setting[accelerator]  # else the library's, moved into the space
                value = setting[accelerator][param] if named else _library_default(accelerator, param)
                placed = value if value in bounds else (bounds[0] if clip or not named else None)
                if placed is None:
                    return None
            elif param in setting[accelerator]:
                placed = _place(setting[accelerator][param], bounds, kind, clip)
                if placed is None:
                    return None
            else:  # not named by the source: the library's default, moved into the space
                placed = _place(_library_default(accelerator, param), bounds, kind, clip=True)
            params[f"{accelerator}.{param}"] = placed
    return params


def _place(value, bounds: tuple, kind: type, clip: bool):
    """`value` on the range, snapped to its step; outside the range: clipped with `clip`, else None."""
    low, high, step = bounds
    if clip:
        value = min(max(value, low), high)
    if not low <= value <= high:
        return None
    if step:
        value = min(low + round((value - low) / step) * step, high)
    return kind(value) if kind is int else round(float(value), 10)


def warm_start_params(spec: StudySpec, storage) -> list[dict]:
    """The params to enqueue for the spec's `search.warm_start` list, in order, without repeats
    (none for grid search: the grid visits every point anyway)."""
    found: list[dict] = []
    if spec.search.sampler == "grid":
        return found
    for source in spec.search.warm_start:
        if source == "published":
            candidates = [(s, False) for s in published_settings(spec)]
        else:
            candidates = [(s, True) for s in _study_settings(storage, source.removeprefix("study:"))]
        for setting, clip in candidates:
            params = trial_params(spec, setting, clip)
            if params is not None and params not in found:
                found.append(params)
    return found


def _study_settings(storage, name: str) -> list[dict]:
    try:
        other, other_spec = load_study(storage, name)
    except UsageError:
        raise UsageError(f"warm start study:{name}: no optsearch study named {name!r} in this "
                         "storage (`optsearch study list` shows them)") from None
    return [trial.user_attrs["setting"] for trial in ranked(other, other_spec, top=3)]


def enqueue_warm_start(study: optuna.Study, params: list[dict]) -> None:
    """Enqueue the warm-start params (from `warm_start_params`) before any sampled trial."""
    for values in params:
        study.enqueue_trial(values, skip_if_exists=True)
    logger.info("warm start: %d settings enqueued", len(params))
