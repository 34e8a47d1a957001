"""Copying a study to another storage: a study begun on one GPU's SQLite file goes on with many
workers on PostgreSQL (or a study is branched under a new name), keeping every measured trial.

Optuna's `copy_study` copies trials, attrs and the study's system attrs as they are. Two things
it leaves wrong for us: optuna-dashboard keeps each trial's note in the study's system attrs under
the trial's storage id ("dashboard:<id>:note_ver"), and a copied trial gets a new id, so a note
would land on no trial or on another one; and a trial still running has no worker in the new
storage. Here notes follow their trials, a study with a running trial is refused, and a copy that
fails half-way is deleted, so the destination holds the whole study or none of it.
"""

from __future__ import annotations

import contextlib
import re

import optuna
from optuna.trial import TrialState

from optsearch.errors import UsageError
from optsearch.storage.record import utc_now

_TRIAL_NOTE_KEY = re.compile(r"^dashboard:(\d+):(note_ver|note_str:\d+)$")
COPIED_ATTR = "optsearch:copied_from"  # [{storage, study, trials, at}]: where the trials came from


def check_copyable(study: optuna.Study, trials: list | None = None) -> None:
    """UsageError while a worker measures a trial of the study: a copied running trial would have
    no worker to finish it."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    if running:
        raise UsageError(f"study {study.study_name!r} has {len(running)} running trial(s) "
                         f"({', '.join(map(str, running[:5]))}): a worker is measuring it, and a "
                         "copied running trial would have no worker to finish it; stop the workers "
                         "first (a stopped worker's trial is re-queued, and copied as queued)")


def copy_study(study: optuna.Study, to_storage, name: str, origin: str) -> optuna.Study:
    """Copy `study` into `to_storage` as study `name`: its trials with the same numbers, states,
    parameters, values and attrs, its user and system attrs, and each trial's dashboard note on the
    trial's copy; the copy records where it came from (`origin`: the source storage's URL, masked).
    Refused (`check_copyable`) while a trial runs; optuna's DuplicatedStudyError when `name` exists
    there."""
    trials = study.get_trials(deepcopy=False)  # one read: the copy is of this moment
    check_copyable(study, trials)
    copy = optuna.create_study(study_name=name, storage=to_storage, directions=study.directions)
    try:
        new_ids = {}
        for trial in trials:
            new_ids[trial._trial_id] = to_storage.create_new_trial(copy._study_id, template_trial=trial)
        for key, value in study._storage.get_study_system_attrs(study._study_id).items():
            if (key := _for_copy(key, new_ids)) is not None:
                to_storage.set_study_system_attr(copy._study_id, key, value)
        for key, value in study.user_attrs.items():
            copy.set_user_attr(key, value)
        copy.set_user_attr(COPIED_ATTR, [*study.user_attrs.get(COPIED_ATTR, []), {
            "storage": origin, "study": study.study_name, "trials": len(trials), "at": utc_now()}])
    except BaseException:  # never leave half a study behind (Ctrl-C included)
        with contextlib.suppress(Exception):  # the error that stopped the copy is the one to tell
            optuna.delete_study(study_name=name, storage=to_storage)
        raise
    return copy


def _for_copy(key: str, new_ids: dict[int, int]) -> str | None:
    """A study system attr's key in the copy: a trial's note keyed by the trial's new id (None:
    the note of no trial of this study, which could land on another trial there)."""
    match = _TRIAL_NOTE_KEY.match(key)
    if match is None:
        return key
    if int(match.group(1)) not in new_ids:
        return None
    return f"dashboard:{new_ids[int(match.group(1))]}:{match.group(2)}"
