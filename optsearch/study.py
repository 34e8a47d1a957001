"""Optuna studies for optsearch: creation from a spec, the search space, objectives, constraints,
per-device baselines, and reading results back.

The validated spec lives in the study's user attrs, so a worker needs only the study name and the
storage. Samplers are not stored by Optuna: every worker builds the spec's sampler itself.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .accelerators import combo_name
from .errors import UsageError
from .quality import Interval, quality_margin
from .samplers import make_sampler
from .spec import StudySpec, spec_from_dict
from .storage import mask

SPEC_ATTR = "optsearch:spec"
VERSION_ATTR = "optsearch:version"
BASELINE_PREFIX = "optsearch:baseline:"
CALIBRATION_PREFIX = "optsearch:calibration:"
TIMING_PREFIX = "optsearch:timing:"  # + fingerprint:worker -> the baseline timings of one worker
CONFIRM_PREFIX = "optsearch:confirm:"  # + digest -> one setting re-measured on unseen prompts
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# The older constraint form that optuna-dashboard reads (Optuna 5 stores "constraints:<name>").
DASHBOARD_CONSTRAINTS_KEY = "constraints"

# Optuna logs failed trials with tracebacks; workers report failures in one line themselves.
optuna.logging.set_verbosity(optuna.logging.ERROR)


def metric_direction(metric: str) -> str:
    """CLIP loss is minimized; PSNR and SSIM (fidelity) are maximized."""
    return "minimize" if metric == "clip_loss" else "maximize"


def directions(spec: StudySpec) -> list[str]:
    metric = metric_direction(spec.quality.metric)
    return {"max-speedup": ["maximize"], "target-speedup": [metric],
            "pareto": ["maximize", metric]}[spec.objective.mode]


def objective_values(spec: StudySpec, summary: dict) -> list[float]:
    """The values told to Optuna for a finished evaluation, in the order of `directions`."""
    speedup, quality = summary["speedup"], summary[spec.quality.metric]["mean"]
    return {"max-speedup": [speedup], "target-speedup": [quality],
            "pareto": [speedup, quality]}[spec.objective.mode]


def metric_names(spec: StudySpec) -> list[str]:
    """Names of the objective values, in the order of `directions` (shown by the dashboard)."""
    return {"max-speedup": ["speedup"], "target-speedup": [spec.quality.metric],
            "pareto": ["speedup", spec.quality.metric]}[spec.objective.mode]


def constraint_text(spec: StudySpec) -> str:
    """The constraint that decides feasibility in the spec's mode, as a user reads it."""
    rule = "" if spec.quality.rule == "mean" else " (its confidence bound)"
    if spec.objective.mode == "target-speedup":
        return f"speedup{rule} >= objective.target_speedup = {spec.objective.target_speedup}"
    sign = "<=" if spec.quality.metric == "clip_loss" else ">="
    return f"{spec.quality.metric}{rule} {sign} quality.limit = {spec.quality.limit}"


def relax_hint(spec: StudySpec) -> str:
    if spec.objective.mode == "target-speedup":
        return "run more trials or lower objective.target_speedup"
    return "run more trials or relax quality.limit"


def constraints(spec: StudySpec, summary: dict) -> dict[str, float]:
    """Optuna constraint values (feasible when <= 0) for a measured setting.

    `quality.rule` decides which figure must meet the limit: the mean, or ("bound") the confidence
    bound on the unsafe side (the speedup's low bound in target-speedup mode).
    """
    rule = spec.quality.rule
    if spec.objective.mode == "target-speedup":
        speedup = summary["speedup"] if rule == "mean" else summary.get("speedup_low")
        if speedup is None or not math.isfinite(speedup):
            return {"speedup": 1e9}
        return {"speedup": spec.objective.target_speedup - speedup}
    figures = summary[spec.quality.metric]  # {"mean", "low", "high"}; bounds may be missing
    interval = Interval(figures["mean"], figures.get("low", -math.inf), figures.get("high", math.inf))
    return {"quality": quality_margin(interval, spec.quality.metric, spec.quality.limit, rule)}


def is_feasible(trial: FrozenTrial) -> bool:
    values = trial.user_attrs.get("constraints")
    return values is not None and all(v <= 0 for v in values.values())


def suggest_setting(trial: optuna.Trial, spec: StudySpec) -> dict[str, dict]:
    """Sample one setting: the combo (a categorical when several), then its parameters."""
    from .accelerators import fit_to_steps, params_of

    combos = {combo_name(c): c for c in spec.search.combos}
    combo = combos[trial.suggest_categorical("combo", list(combos))] if len(combos) > 1 \
        else next(iter(combos.values()))
    setting: dict[str, dict] = {}
    for accelerator in combo:
        values = {}
        for param, declared in params_of(accelerator).items():
            bounds = spec.param_range(accelerator, param)
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


def spec_attr(spec: StudySpec) -> dict:
    """The spec as stored in the study (without its name: a study may be created under another)."""
    data = spec.to_dict()
    data.pop("name")
    return _without_none(data)


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def create_study(spec: StudySpec, storage, name: str | None = None,
                 load_if_exists: bool = False) -> optuna.Study:
    """Create the study for `spec`; an existing name is an error unless loaded with the same spec.

    A new study gets its warm-start settings enqueued (warm_start.py).
    """
    from . import __version__
    from .warm_start import enqueue_warm_start, warm_start_params

    name = name or spec.name
    wanted = spec_attr(spec)
    warm_start = warm_start_params(spec, storage)  # before creating: a bad source writes nothing
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions(spec))
    except optuna.exceptions.DuplicatedStudyError:
        existing = optuna.load_study(study_name=name, storage=storage)
        stored = existing.user_attrs.get(SPEC_ATTR)
        if stored is None:
            raise UsageError(f"study {name!r} exists in {mask(storage.url)} but was not made by "
                             "optsearch: choose another --name") from None
        if not load_if_exists:
            raise UsageError(f"study {name!r} already exists in {mask(storage.url)}: pass "
                             "--load-if-exists to join it with the same spec, or --name") from None
        if _canonical(stored) != _canonical(wanted):
            differing = ", ".join(_differences(stored, wanted)[:5])
            raise UsageError(f"study {name!r} exists with a different spec (differs in: "
                             f"{differing}): use another --name") from None
        return load_study(storage, name)[0]
    with warnings.catch_warnings():  # experimental in Optuna, and what the dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(metric_names(spec))
    study.set_user_attr(SPEC_ATTR, wanted)
    study.set_user_attr(VERSION_ATTR, __version__)
    study.sampler = make_sampler(spec)
    enqueue_warm_start(study, warm_start)
    return study


def _canonical(data: dict) -> str:
    return json.dumps(data, sort_keys=True)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    found = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}")
    return found


def load_study(storage, name: str) -> tuple[optuna.Study, StudySpec]:
    """Load an optsearch study and its spec; a missing study is a usage error."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise UsageError(f"no study named {name!r} in {mask(storage.url)} "
                         "(`optsearch study list` shows the studies there)") from None
    stored = study.user_attrs.get(SPEC_ATTR)
    if stored is None:
        raise UsageError(f"study {name!r} was not created by optsearch (no spec stored)")
    spec = spec_from_dict({"name": name, **stored}, source=f"study {name}")
    study.sampler = make_sampler(spec)
    return study, spec


def progress(storage, name: str) -> tuple[int, int] | None:
    """(finished trials, n_trials) of an optsearch study, or None when there is no such study."""
    try:
        study, spec = load_study(storage, name)
    except UsageError:  # no such study, or not optsearch's: the caller's own path says so
        return None
    return len(finished_trials(study)), spec.search.n_trials


def baselines(study: optuna.Study) -> dict[str, dict]:
    """Every stored baseline, keyed by device fingerprint."""
    return {key.removeprefix(BASELINE_PREFIX): value for key, value in study.user_attrs.items()
            if key.startswith(BASELINE_PREFIX)}


def save_baseline(study: optuna.Study, record: dict) -> None:
    study.set_user_attr(BASELINE_PREFIX + record["fingerprint"], record)


def save_timing(study: optuna.Study, record: dict) -> None:
    """Store (replace) one worker's baseline timings for one fingerprint."""
    study.set_user_attr(f"{TIMING_PREFIX}{record['fingerprint']}:{record['worker']}", record)


def timings(study: optuna.Study) -> list[dict]:
    """Every worker's baseline timing record, oldest first."""
    records = [value for key, value in study.user_attrs.items() if key.startswith(TIMING_PREFIX)]
    return sorted(records, key=lambda r: r["timings"][0]["at"] if r.get("timings") else "")


def calibration(study: optuna.Study, fingerprint: str) -> dict[str, dict]:
    """Per-model data families measured on this fingerprint (MagCache's ratios), by family."""
    prefix = f"{CALIBRATION_PREFIX}{fingerprint}:"
    return {key.removeprefix(prefix): value for key, value in study.user_attrs.items()
            if key.startswith(prefix)}


def save_calibration(study: optuna.Study, fingerprint: str, family: str, data: dict) -> None:
    """Store one family's calibration: every worker on this fingerprint reuses it."""
    study.set_user_attr(f"{CALIBRATION_PREFIX}{fingerprint}:{family}", data)


def save_confirmation(study: optuna.Study, record: dict) -> None:
    study.set_user_attr(CONFIRM_PREFIX + record["key"], record)


def confirmations(study: optuna.Study) -> dict[str, dict]:
    """Every stored confirmation, keyed by its digest (setting, device fingerprint, prompts)."""
    return {key.removeprefix(CONFIRM_PREFIX): value for key, value in study.user_attrs.items()
            if key.startswith(CONFIRM_PREFIX)}


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def merit(spec: StudySpec, first_value: float) -> float:
    """The first objective value oriented so that larger is better (speedup, or the metric in
    target-speedup mode); pareto fronts pick their highest speedup."""
    minimized = spec.objective.mode == "target-speedup" and \
        metric_direction(spec.quality.metric) == "minimize"
    return -first_value if minimized else first_value


def _better(spec: StudySpec, a: FrozenTrial, b: FrozenTrial | None) -> bool:
    """Is `a` a better single best than `b`?"""
    return b is None or merit(spec, a.values[0]) > merit(spec, b.values[0])


def best_per_combo(study: optuna.Study, spec: StudySpec) -> dict[str, FrozenTrial]:
    """The best feasible COMPLETE trial of each combo (original measurements preferred)."""
    best: dict[str, FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if not is_feasible(trial) or trial.user_attrs.get("reused_from") is not None:
            continue
        combo = trial.user_attrs.get("combo", "?")
        if _better(spec, trial, best.get(combo)):
            best[combo] = trial
    return best


def best_overall(study: optuna.Study, spec: StudySpec) -> FrozenTrial | None:
    best = None
    for trial in best_per_combo(study, spec).values():
        if _better(spec, trial, best):
            best = trial
    return best


def pareto_front(study: optuna.Study, spec: StudySpec) -> list[FrozenTrial]:
    """The feasible non-dominated trials (pareto mode)."""
    signs = [1 if d == "maximize" else -1 for d in directions(spec)]
    candidates = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                  if is_feasible(t) and t.user_attrs.get("reused_from") is None]

    def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
        pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values, strict=True)]
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)

    front = [t for t in candidates if not any(dominates(o, t) for o in candidates)]
    return sorted(front, key=lambda t: -t.values[0])


def trial_metrics(trial: FrozenTrial) -> dict:
    """The figures recorded on a trial, for tables and exports."""
    keys = ("combo", "setting", "speedup", "speedup_low", "speedup_high", "seconds_per_image",
            "baseline_seconds_per_image",
            "clip_mean", "clip_loss", "clip_loss_low", "clip_loss_high", "psnr", "psnr_low",
            "psnr_high", "ssim", "ssim_low", "ssim_high",
            "clip_image_cosine", "batches_evaluated", "early_stopped", "device", "host",
            "batch_size", "fingerprint", "constraints", "reused_from")
    metrics = {key: trial.user_attrs.get(key) for key in keys}
    metrics["trial"] = trial.number
    metrics["state"] = trial.state.name
    metrics["feasible"] = is_feasible(trial)
    return metrics


def metric_interval(attrs: dict, metric: str) -> dict:
    """{mean, low, high} of a metric from a trial's flat attrs (`psnr`, `psnr_low`, `psnr_high`)."""
    return {"mean": attrs.get(metric), "low": attrs.get(f"{metric}_low"),
            "high": attrs.get(f"{metric}_high")}


def finite(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
