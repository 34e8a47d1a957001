"""The study's one answer: which setting wins, by one stated rule, marked the same everywhere.

`study show` stars it, `study export` and `optsearch.search()` write it, and the dashboard shows it
in the study's note and the study's user attr "winner" (its own "Best Trial" badge is Optuna's best
objective value, which knows nothing of confirmation). The rule:

- once settings were confirmed on unseen prompts (`study confirm`), the winner is, among those
  feasible and faster than the baseline there, the one with the best confirmed lower speedup bound
  (max-speedup mode: the speedup a user can count on, not the luckiest point estimate; other
  modes: the best by the objective): confirmation is the figure a user will see;
- before that, the best feasible search trial by the objective.

Either way a setting no faster than the baseline is no winner (objectives.is_faster). Figures are
of one device: confirmations and trials are taken from one device fingerprint — the one asked for,
else the one the confirmations were made on (the latest confirmation's where several were, which
`study export` refuses to guess: it lists them).
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

from optsearch.errors import UsageError
from optsearch.formatting import format_interval, format_setting, format_speedup
from optsearch.measure.speedup import repeat_range
from optsearch.optimize import reference
from optsearch.optimize.objectives import best_overall, is_faster, merit, objective_values
from optsearch.optimize.study import confirmations, exhausted, exhausted_text
from optsearch.storage.notes import write_trial_note
from optsearch.storage.record import faster_than_baseline, quality_of, speedup_of, trial_metrics

CONFIRMED_RULE = ("best confirmed lower speedup bound among the settings feasible on unseen prompts "
                  "(study confirm)")
CONFIRMED_OBJECTIVE_RULE = "best feasible on unseen prompts (study confirm), {by}"
SEARCH_RULE = "best feasible search trial, {by} (not confirmed yet)"


def _by(spec) -> str:
    """How the objective ranks, in words: a Pareto front has two objectives; its one answer is
    the fastest of it (objectives.merit)."""
    return "the fastest of the front" if spec.objective.mode == "pareto" else "by the objective"


@dataclass(frozen=True)
class Winner:
    trial: FrozenTrial
    confirmed: dict | None  # the confirmation record it won on, when confirmed
    rule: str
    fingerprint: str | None = None  # the device whose figures it won on


def repeat_of(found: Winner) -> dict | None:
    """Where a user's own fresh measurement of the winner should read (speedup.repeat_range), from
    the figures it won on: its confirmation's rounds when confirmed, else its search trial's."""
    interval = speedup_of(found.confirmed or found.trial.user_attrs)
    repeat = repeat_range(interval) if interval else None
    if repeat is None:
        return None
    return {"low": repeat.low, "high": repeat.high,
            "from": "confirmation" if found.confirmed else "search"}


def device_choices(study: optuna.Study) -> dict[str, str]:
    """{fingerprint: device} of every device the study's trials or confirmations were measured on."""
    choices = {r["fingerprint"]: r.get("device", "?") for r in confirmations(study).values()}
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get("fingerprint"):
            choices.setdefault(trial.user_attrs["fingerprint"], trial.user_attrs.get("device", "?"))
    return choices


def chosen_fingerprint(study: optuna.Study, fingerprint: str | None, strict: bool) -> str | None:
    """The device whose figures decide: `fingerprint` when given (it must be known), else the one
    confirmations were made on; several of those is an error when `strict` (export), else the
    latest confirmation's."""
    if fingerprint is not None:
        choices = device_choices(study)
        if fingerprint not in choices:
            raise UsageError(f"--fingerprint {fingerprint}: no trial or confirmation of study "
                             f"{study.study_name!r} was measured there ({_listed(choices)})")
        return fingerprint
    records = sorted(confirmations(study).values(), key=lambda r: r["date"])
    if records:
        _refuse_several(study, {r["fingerprint"] for r in records}, "confirmed", strict)
        return records[-1]["fingerprint"]
    if strict:  # the workers' per-trial winner marks need no scan of every trial here
        searched_on = {t.user_attrs.get("fingerprint")
                       for t in study.get_trials(deepcopy=False)} - {None}
        _refuse_several(study, searched_on, "measured", strict)
    return None


def _refuse_several(study: optuna.Study, fingerprints: set[str], verb: str, strict: bool) -> None:
    """A UsageError listing the devices when `strict` and there are several to choose from."""
    if len(fingerprints) > 1 and strict:
        choices = device_choices(study)
        raise UsageError(f"study {study.study_name!r} was {verb} on {len(fingerprints)} devices "
                         f"({_listed({f: choices[f] for f in sorted(fingerprints)})}): choose one "
                         "with --fingerprint ID")


def _listed(choices: dict[str, str]) -> str:
    return ", ".join(f"{f} ({device})" for f, device in choices.items()) or "none"

def latest_by_trial(records: list[dict]) -> dict[int, dict]:
    """Each trial's latest confirmation record (dates are ISO text of one clock: sortable)."""
    latest: dict[int, dict] = {}
    for record in sorted(records, key=lambda r: r["date"]):
        latest[record["trial"]] = record
    return latest


def best_confirmed(records: list[dict], spec) -> dict | None:
    """The best setting that is feasible and faster than the baseline on confirmation: by its
    lower speedup bound in max-speedup mode (no bound: ranked below every bounded one), else by
    the objective."""
    kept = [r for r in records if r["feasible"] and faster_than_baseline(r)]  # its stored verdict
    if spec.objective.mode == "max-speedup":
        return max(kept, key=lambda r: (r.get("speedup_low") is not None,
                                        r.get("speedup_low") or 0.0, r["speedup"]), default=None)
    return max(kept, key=lambda r: merit(spec, objective_values(spec, r)[0]), default=None)


def confirmed_rule(spec) -> str:
    return CONFIRMED_RULE if spec.objective.mode == "max-speedup" else \
        CONFIRMED_OBJECTIVE_RULE.format(by=_by(spec))


def winner(study: optuna.Study, spec, fingerprint: str | None = None,
           strict: bool = False) -> Winner | None:
    """The study's winner by the rule above, on one device (see `chosen_fingerprint`); None when
    nothing qualifies (yet)."""
    fingerprint = chosen_fingerprint(study, fingerprint, strict)
    records = [r for r in confirmations(study).values()
               if fingerprint is None or r["fingerprint"] == fingerprint]
    if records:
        record = best_confirmed(records, spec)
        if record is None:
            return None
        trial = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(
            study._study_id, record["trial"]))
        return Winner(trial, record, confirmed_rule(spec), fingerprint)
    trial = best_overall(study, spec, fingerprint)
    return Winner(trial, None, SEARCH_RULE.format(by=_by(spec)), fingerprint) \
        if trial is not None and is_faster(trial) else None


def mark_winner(study: optuna.Study, spec) -> Winner | None:
    """Store the winner where the dashboard shows it: the study's user attr "winner" and note."""
    found = winner(study, spec)
    if found is None:
        mark, note = None, "## No winner yet\n\nNo setting is feasible and faster than the baseline.\n"
    else:
        figures = found.confirmed or found.trial.user_attrs
        metric = spec.quality.metric
        # the headline comparison: search figures against the line's, measured on the same prompts
        line = reference.verdict(trial_metrics(found.trial), reference.steps_frontier(study, spec),
                                 metric)
        mark = {"trial": found.trial.number, "rule": found.rule,
                "setting": found.trial.user_attrs.get("setting"),
                "speedup": figures.get("speedup"), "speedup_low": figures.get("speedup_low"),
                "speedup_high": figures.get("speedup_high"), "confirmed": found.confirmed is not None,
                "fewer_steps": reference.verdict_text(line) or reference.missing_text(study, spec)}
        note = (f"## Winner: trial {found.trial.number}\n\n"
                f"- {format_setting(mark['setting'] or {})}\n"
                f"- speedup **{format_speedup(figures)}**, {metric} "
                f"**{format_interval(quality_of(figures, metric))}**\n"
                f"- chosen as the {found.rule}\n"
                + (f"- {mark['fewer_steps']} (search figures)\n" if mark["fewer_steps"] else "")
                + "- the dashboard's \"Best Trial\" is Optuna's best search value, not this rule\n")
    done = [exhausted_text(record) for record in exhausted(study).values()]
    if done:  # why a study stopped short of n_trials
        note += "\n## Search\n\n" + "".join(f"- {line}\n" for line in done)
    if study.user_attrs.get("winner") != mark:
        study.set_user_attr("winner", mark)
    write_trial_note(study, None, note)  # written only when its text changed
    return found
