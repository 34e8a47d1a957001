"""What a study optimizes and what it calls feasible: the values told to Optuna, the constraint
each trial carries, and the ranking that picks the best trials from them."""

from __future__ import annotations

import json
import math
from collections import Counter

import optuna
from optuna.trial import FrozenTrial, TrialState

from optsearch.measure.metrics import Interval, direction, limit_sign, quality_margin
from optsearch.storage.record import (
    combo_label,
    computation_key,
    faster_than_baseline,
    feasible,
    is_copy,
    missed,
    quality_of,
)
from optsearch.study_spec import StudySpec


def directions(spec: StudySpec) -> list[str]:
    metric = direction(spec.quality.metric)
    return {"max-speedup": ["maximize"], "target-speedup": [metric],
            "pareto": ["maximize", metric]}[spec.objective.mode]


def objective_values(spec: StudySpec, summary: dict) -> list[float]:
    """The values told to Optuna for a finished evaluation, in the order of `directions`."""
    speedup, quality = summary["speedup"], quality_of(summary, spec.quality.metric).mean
    return {"max-speedup": [speedup], "target-speedup": [quality],
            "pareto": [speedup, quality]}[spec.objective.mode]


def metric_names(spec: StudySpec) -> list[str]:
    """Names of the objective values, in the order of `directions` (shown by the dashboard)."""
    return {"max-speedup": ["speedup"], "target-speedup": [spec.quality.metric],
            "pareto": ["speedup", spec.quality.metric]}[spec.objective.mode]


def constraint_text(spec: StudySpec) -> str:
    """The constraint that decides feasibility in the spec's mode, as a user reads it."""
    rule = "" if spec.quality.rule == "mean" else " (its confidence bound)"
    memory = ("" if spec.objective.max_memory_gib is None else
              f" and peak memory <= objective.max_memory_gib = {spec.objective.max_memory_gib}")
    if spec.objective.mode == "target-speedup":
        return f"speedup{rule} >= objective.target_speedup = {spec.objective.target_speedup}{memory}"
    metric = spec.quality.metric
    if spec.quality.statistic != "mean":
        rule = {"worst": " of every prompt", "p10": " of nine prompts in ten"}[spec.quality.statistic]
    return f"{metric}{rule} {limit_sign(metric)} quality.limit = {spec.quality.limit}{memory}"


def relax_hint(spec: StudySpec, measured: list = ()) -> str:
    """What to change when nothing is feasible: the memory limit when the `measured` trials (or
    confirmation records) missed it at least as often as the quality or speedup constraint."""
    records = [getattr(one, "user_attrs", one) for one in measured]
    misses = Counter(name for record in records for name in missed(record))
    if misses["memory"] and misses["memory"] >= max(misses.values()):
        peaks = [r["peak_memory_gib"] for r in records if r.get("peak_memory_gib") is not None]
        lowest = f" (the lowest peak {min(peaks):.2f} GiB)" if peaks else ""
        return (f"{misses['memory']} of {len(records)} measured peaked above "
                f"objective.max_memory_gib = {spec.objective.max_memory_gib}{lowest}: raise it, "
                "or run more trials")
    name, key, knob = (("speedup", "objective.target_speedup", "lower objective.target_speedup")
                       if spec.objective.mode == "target-speedup"
                       else ("quality", "quality.limit", "relax quality.limit"))
    meeting = [r for r in records if feasible(r)]
    if meeting:  # they meet the limit, but none beat the baseline
        fastest = max(r.get("speedup") or 0.0 for r in meeting)
        return (f"{len(meeting)} of {len(records)} measured meet it, none faster than the "
                f"baseline (the fastest of them {fastest:.2f}x): run more trials, or {knob} for "
                "settings that skip more")
    gaps = [r["constraints"][name] for r in records if name in (r.get("constraints") or {})]
    closest = (f"the closest of {len(records)} measured missed {key} by {min(gaps):.3g}: "
               if gaps else "")
    return f"{closest}run more trials or {knob}"


def constraints(spec: StudySpec, summary: dict) -> dict[str, float]:
    """Optuna constraint values (feasible when <= 0) for a measured setting.

    `quality.rule` decides which figure must meet the limit: the mean, or ("bound") the confidence
    bound on the unsafe side (the speedup's low bound in target-speedup mode). With
    `objective.max_memory_gib`, a setting whose timed batches peaked above it is infeasible (as is
    one whose memory could not be read: it cannot be said to fit).
    """
    found = _limit_constraints(spec, summary)
    limit = spec.objective.max_memory_gib
    if limit is not None:
        peak = summary.get("peak_memory_gib")
        found["memory"] = 1e9 if peak is None else peak - limit
    return found


def _limit_constraints(spec: StudySpec, summary: dict) -> dict[str, float]:
    rule = spec.quality.rule
    if spec.objective.mode == "target-speedup":
        speedup = summary["speedup"] if rule == "mean" else summary.get("speedup_low")
        if speedup is None or not math.isfinite(speedup):
            return {"speedup": 1e9}
        return {"speedup": spec.objective.target_speedup - speedup}
    metric, statistic = spec.quality.metric, spec.quality.statistic
    if statistic != "mean":  # the worst (or 10th-percentile) prompt's own figure meets the limit
        value = summary.get(f"{metric}_{statistic}")
        if value is None:
            return {"quality": 1e9}
        return {"quality": quality_margin(Interval(value, value, value), metric, spec.quality.limit)}
    interval = quality_of(summary, metric)
    return {"quality": quality_margin(interval, metric, spec.quality.limit, rule)}


def is_feasible(trial: FrozenTrial) -> bool:
    return feasible(trial.user_attrs)


def is_faster(trial: FrozenTrial) -> bool:
    """Did the trial run faster than the baseline? A slower or inert setting is never a study's
    best (record.faster_than_baseline)."""
    return faster_than_baseline(trial.user_attrs)


def merit(spec: StudySpec, first_value: float) -> float:
    """The first objective value oriented so that larger is better (speedup, or the metric in
    target-speedup mode); pareto fronts pick their highest speedup."""
    minimized = spec.objective.mode == "target-speedup" and \
        direction(spec.quality.metric) == "minimize"
    return -first_value if minimized else first_value


def _better(spec: StudySpec, a: FrozenTrial, b: FrozenTrial | None) -> bool:
    """Is `a` a better single best than `b`?"""
    return b is None or merit(spec, a.values[0]) > merit(spec, b.values[0])


def _measured_feasible(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible COMPLETE trials faster than the baseline that measured their setting (not copies
    of an earlier trial)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if is_feasible(t) and is_faster(t) and not is_copy(t)]


def best_per_combo(study: optuna.Study, spec: StudySpec,
                   fingerprint: str | None = None) -> dict[str, FrozenTrial]:
    """The best feasible COMPLETE trial of each combo faster than the baseline (original
    measurements preferred), of one device fingerprint when given."""
    best: dict[str, FrozenTrial] = {}
    for trial in _measured_feasible(study):
        if fingerprint is not None and trial.user_attrs.get("fingerprint") != fingerprint:
            continue
        combo = combo_label(trial)  # each distill recipe its own row
        if _better(spec, trial, best.get(combo)):
            best[combo] = trial
    return best


def best_overall(study: optuna.Study, spec: StudySpec,
                 fingerprint: str | None = None) -> FrozenTrial | None:
    """The best feasible trial of all (of one device fingerprint, when given)."""
    best = None
    for trial in best_per_combo(study, spec, fingerprint).values():
        if _better(spec, trial, best):
            best = trial
    return best


def pareto_front(study: optuna.Study, spec: StudySpec) -> list[FrozenTrial]:
    """The feasible non-dominated trials (pareto mode)."""
    signs = [1 if d == "maximize" else -1 for d in directions(spec)]
    candidates = _measured_feasible(study)

    def dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
        pairs = [(s * x, s * y) for s, x, y in zip(signs, a.values, b.values, strict=True)]
        return all(x >= y for x, y in pairs) and any(x > y for x, y in pairs)

    front = [t for t in candidates if not any(dominates(o, t) for o in candidates)]
    return sorted(front, key=lambda t: -t.values[0])


def ranked(study: optuna.Study, spec: StudySpec, top: int) -> list[FrozenTrial]:
    """The `top` best feasible settings, then each combo's best, one trial per distinct setting
    and per distinct computation (what confirmation re-measures and a warm start copies): a trial
    that made the very images of a better one (a neighbouring threshold, the same skips) would
    be the same computation measured again, so the next distinct one takes its place."""
    if spec.objective.mode == "pareto":
        order = pareto_front(study, spec)
    else:
        order = sorted(_measured_feasible(study), key=lambda t: -merit(spec, t.values[0]))
    chosen: list[FrozenTrial] = []
    seen: set[str] = set()

    def take(trial: FrozenTrial) -> None:
        keys = {setting_key(trial.user_attrs["setting"]),
                computation_key(trial.user_attrs) or f"trial {trial.number}"}
        if not keys & seen:
            chosen.append(trial)
        seen.update(keys)

    for trial in order:
        if len(chosen) == top:
            break
        take(trial)
    for trial in best_per_combo(study, spec).values():
        take(trial)
    return chosen




def setting_key(setting: dict) -> str:
    """One text per distinct setting, whatever its key order."""
    return json.dumps(setting, sort_keys=True)
