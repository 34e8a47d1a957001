"""The "fewer steps only" reference line: what plain step reduction reaches at each quality.

A speedup claim is worth something only when the setting beats simply running fewer steps at the
same quality. Wherever a study searches `steps` alone, its measured steps-only trials form this
reference; `verdict` says for a setting whether it beats the line at equal (or better) quality,
and by how much speedup, with an interval: only a margin whose interval lies above 1x beats it
(a near-tie is said as one). Running all of `model.steps` (the baseline, 1.0x) is always on the line.
"""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState

from optsearch.formatting import format_speedup, too_wide
from optsearch.measure.metrics import at_least_as_good
from optsearch.optimize.early_stop import STEPS_ONLY
from optsearch.storage.record import quality_of, speedup_of


def steps_frontier(study: optuna.Study, spec) -> list[dict]:
    """The steps-only trials no other steps-only trial beats on both speedup and quality, fastest
    first: [{trial, num_inference_steps, speedup, speedup_low, speedup_high, <metric>,
    <metric>_low, <metric>_high}]."""
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
                       **speedup.to_dict(), metric: quality.mean,
                       **{f"{metric}_{bound}": attrs.get(f"{metric}_{bound}") for bound in ("low", "high")}})
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
    low, high = margin_interval(figures, reference)
    return {
        "reference_trial": reference["trial"] if reference else None,
        "reference_steps": reference["num_inference_steps"] if reference else None,
        "reference_speedup": reference_speedup,
        "reference_speedup_low": reference["speedup_low"] if reference else None,
        "reference_speedup_high": reference["speedup_high"] if reference else None,
        "margin": figures["speedup"] / reference_speedup,
        "margin_low": low,
        "margin_high": high,
        # told apart only when the interval says so: a near-tie is not a win
        "beats": low is not None and not too_wide(low, high) and low > 1.0,
    }


def margin_interval(figures: dict, reference: dict | None) -> tuple[float | None, float | None]:
    """The interval of a setting's speedup over the reference's (over the baseline's 1.0x when
    None: then the setting's own interval): the two speedups' log-scale widths added in
    quadrature. The baseline's noise is in both and cancels in the ratio, so counting it twice
    errs wide, never narrow. (None, None) when either speedup has no interval."""
    widths = _log_widths(figures)
    reference_widths = (0.0, 0.0) if reference is None else _log_widths(reference)
    if widths is None or reference_widths is None:
        return None, None
    margin = math.log(figures["speedup"]) - math.log(reference["speedup"] if reference else 1.0)
    return (math.exp(margin - math.hypot(widths[0], reference_widths[1])),
            math.exp(margin + math.hypot(widths[1], reference_widths[0])))


def _log_widths(figures: dict) -> tuple[float, float] | None:
    """(below, above) the speedup on a log scale, or None without an interval."""
    speedup, low, high = (figures.get(key) for key in ("speedup", "speedup_low", "speedup_high"))
    if not speedup or low is None or high is None or low <= 0:
        return None
    return math.log(speedup / low), math.log(high / speedup)


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
        at = format_speedup({"speedup": result["reference_speedup"],
                             "speedup_low": result.get("reference_speedup_low"),
                             "speedup_high": result.get("reference_speedup_high")})
        where = (f"fewer steps alone reach its quality at {at} ({result['reference_steps']} "
                 f"steps, trial {result['reference_trial']})")
    low, high = result.get("margin_low"), result.get("margin_high")
    margin = format_speedup({"speedup": result["margin"], "speedup_low": low, "speedup_high": high})
    if result["beats"]:
        return f"beats the fewer-steps line by a factor of {margin}: {where}"
    if low is not None and not too_wide(low, high) and high < 1.0:
        return f"does NOT beat the fewer-steps line (a factor of {margin}): {where}"
    return f"cannot be told apart from the fewer-steps line (a factor of {margin}): {where}"


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
