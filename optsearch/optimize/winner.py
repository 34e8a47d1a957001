"""The study's one answer: which setting wins, by one stated rule, marked the same everywhere.

`study show` stars it, `study export` and `optsearch.search()` write it, and the dashboard shows it
in the study's note and the study's user attr "winner" (its own "Best Trial" badge is Optuna's best
objective value, which knows nothing of confirmation). The rule:

- once settings were confirmed on unseen prompts (`study confirm`), the winner is the best by the
  objective among those feasible there: confirmation is the figure a user will see;
- before that, the best feasible search trial by the objective.

Either way a setting no faster than the baseline is no winner (objectives.is_faster).
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

from optsearch.formatting import format_interval, format_setting, format_speedup
from optsearch.optimize.objectives import best_overall, is_faster, merit, objective_values
from optsearch.optimize.study import confirmations
from optsearch.storage.notes import write_trial_note
from optsearch.storage.record import quality_of

CONFIRMED_RULE = "best feasible on unseen prompts (study confirm), by the objective"
SEARCH_RULE = "best feasible search trial, by the objective (not confirmed yet)"


@dataclass(frozen=True)
class Winner:
    trial: FrozenTrial
    confirmed: dict | None  # the confirmation record it won on, when confirmed
    rule: str


def latest_by_trial(records: list[dict]) -> dict[int, dict]:
    """Each trial's latest confirmation record (dates are ISO text of one clock: sortable)."""
    latest: dict[int, dict] = {}
    for record in sorted(records, key=lambda r: r["date"]):
        latest[record["trial"]] = record
    return latest


def best_confirmed(records: list[dict], spec) -> dict | None:
    """The best setting that is feasible and faster than the baseline on confirmation."""
    feasible = [r for r in records if r["feasible"] and (r.get("speedup") or 0) > 1.0]
    return max(feasible, key=lambda r: merit(spec, objective_values(spec, r)[0]), default=None)


def winner(study: optuna.Study, spec) -> Winner | None:
    """The study's winner by the rule above; None when nothing qualifies (yet)."""
    records = list(confirmations(study).values())
    if records:
        record = best_confirmed(records, spec)
        if record is None:
            return None
        trial = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(
            study._study_id, record["trial"]))
        return Winner(trial, record, CONFIRMED_RULE)
    trial = best_overall(study, spec)
    return Winner(trial, None, SEARCH_RULE) if trial is not None and is_faster(trial) else None


def mark_winner(study: optuna.Study, spec) -> Winner | None:
    """Store the winner where the dashboard shows it: the study's user attr "winner" and note."""
    found = winner(study, spec)
    if found is None:
        mark, note = None, "## No winner yet\n\nNo setting is feasible and faster than the baseline.\n"
    else:
        figures = found.confirmed or found.trial.user_attrs
        metric = spec.quality.metric
        mark = {"trial": found.trial.number, "rule": found.rule,
                "setting": found.trial.user_attrs.get("setting"),
                "speedup": figures.get("speedup"), "confirmed": found.confirmed is not None}
        note = (f"## Winner: trial {found.trial.number}\n\n"
                f"- {format_setting(mark['setting'] or {})}\n"
                f"- speedup **{format_speedup(figures)}**, {metric} "
                f"**{format_interval(quality_of(figures, metric))}**\n"
                f"- chosen as the {found.rule}\n"
                "- the dashboard's \"Best Trial\" is Optuna's best search value, not this rule\n")
    if study.user_attrs.get("winner") != mark:
        study.set_user_attr("winner", mark)
        write_trial_note(study, None, note)
    return found
