"""The "fewer steps only" reference line: what plain step reduction reaches at each quality.

A speedup claim is worth something only when the setting beats simply running fewer steps at the
same quality. Wherever a study searches `steps` alone, its measured steps-only trials form this
reference; `verdict` says for a setting whether it beats the line at equal (or better) quality,
and by how much speedup. Running all of `model.steps` (the baseline, 1.0x) is always on the line.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from optsearch.measure.metrics import at_least_as_good
from optsearch.optimize.early_stop import STEPS_ONLY
from optsearch.storage.record import quality_of, speedup_of


def steps_frontier(study: optuna.Study, spec) -> list[dict]:
    """The steps-only trials no other steps-only trial beats on both speedup and quality, fastest
    first: [{trial, num_inference_steps, speedup, speedup_low, speedup_high, <metric>}]."""
    metric = spec.quality.metric
    points = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        quality, speedup = quality_of(attrs, metric), speedup_of(attrs)
        if attrs.get("combo") != STEPS_ONLY or quality is None or speedup is None \
                or speedup.speedup <= 1.0:  # no faster than the baseline, which is on the line
            continue
        points.append({"trial": trial.number,
                       "num_inference_steps": attrs["setting"]["steps"]["num_inference_steps"],
                       **speedup.to_dict(), metric: quality.mean})
    points.sort(key=lambda p: (-p["speedup"], p["trial"]))
    front: list[dict] = []
    for point in points:  # fastest first: keep a point only if it is better than all faster ones
        if not front or not at_least_as_good(front[-1][metric], point[metric], metric):
            front.append(point)
    return front


def verdict(figures: dict, frontier: list[dict], metric: str) -> dict | None:
    """How a setting's figures compare with the fewer-steps line at equal or better quality: the
    fastest steps-only point at least as good as the setting (else the baseline, 1.0x), and the
    setting's speedup over it. None when the study has no steps-only trial."""
    if not frontier or figures.get("speedup") is None or figures.get(metric) is None:
        return None
    if figures.get("combo") == STEPS_ONLY:
        return {"reference_trial": figures.get("trial"), "reference_steps": None,
                "reference_speedup": figures["speedup"], "margin": 1.0, "beats": False,
                "is_steps_only": True}
    as_good = [p for p in frontier if at_least_as_good(p[metric], figures[metric], metric)]
    reference = max(as_good, key=lambda p: p["speedup"]) if as_good else None
    reference_speedup = reference["speedup"] if reference else 1.0
    return {
        "reference_trial": reference["trial"] if reference else None,
        "reference_steps": reference["num_inference_steps"] if reference else None,
        "reference_speedup": reference_speedup,
        "margin": figures["speedup"] / reference_speedup,
        "beats": figures["speedup"] > reference_speedup,
    }


def verdict_text(result: dict | None) -> str:
    """One line for show/run: does the setting beat plain fewer steps, and by how much."""
    if result is None:
        return ""
    if result.get("is_steps_only"):
        return ("is fewer steps alone: no accelerator in this study beat plain step reduction "
                "within the limit")
    if result["reference_trial"] is None:
        where = "no steps-only trial reaches its quality: the reference is the full-step baseline"
    else:
        where = (f"fewer steps alone reach its quality at {result['reference_speedup']:.2f}x "
                 f"({result['reference_steps']} steps, trial {result['reference_trial']})")
    word = "beats" if result["beats"] else "does NOT beat"
    return f"{word} the fewer-steps line by {result['margin']:.2f}x: {where}"


def missing_text(study: optuna.Study, spec) -> str | None:
    """Why a study that searches steps alone has no reference line yet, in words (None when it
    does not search steps alone, or the line is there)."""
    if [STEPS_ONLY] not in [list(combo) for combo in spec.search.combos]:
        return None
    if steps_frontier(study, spec):
        return None
    trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("combo") == STEPS_ONLY]
    if not trials:
        return "no steps-only trial has run yet: the fewer-steps line comes with more trials"
    if any(t.state == TrialState.COMPLETE for t in trials):
        return ("no steps-only trial ran faster than the baseline: the reference is the "
                "full-step baseline (1.0x)")
    reasons = [t.user_attrs.get("early_stop_reason") for t in trials if t.state == TrialState.PRUNED]
    if reasons and reasons.count("quality") == len(trials):
        return (f"all {len(trials)} steps-only trials fell past the quality limit: fewer steps "
                "alone do not reach it, so the reference is the full-step baseline (1.0x)")
    if reasons:
        counts = ", ".join(f"{reasons.count(r)} {r}" for r in sorted(set(map(str, reasons))))
        return (f"no steps-only trial finished: {len(reasons)} of {len(trials)} stopped early "
                f"({counts}); `study extend` runs more")
    return "no steps-only trial has finished yet: the fewer-steps line comes when one does"
