"""What the workers of one study coordinate through the storage: how many trials are taken, and
results that another worker already measured on the same device."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from optsearch.optimize import study as studies
from optsearch.optimize.objectives import setting_key
from optsearch.storage.record import write_constraints

logger = logging.getLogger(__name__)


class SurplusTrial(Exception):
    """Another worker already holds the last slot of the study's n_trials."""


def counts(study: optuna.Study, ahead_of: int | None = None) -> tuple[int, int]:
    """(finished, running) trials; with `ahead_of`, only running trials numbered below it."""
    trials = study.get_trials(deepcopy=False, states=(*studies.FINISHED, TrialState.RUNNING))
    finished = sum(t.state in studies.FINISHED for t in trials)
    running = sum(t.state == TrialState.RUNNING and (ahead_of is None or t.number < ahead_of)
                  for t in trials)
    return finished, running


def is_surplus(study: optuna.Study, trial: optuna.Trial, n_trials: int) -> bool:
    """True when finished trials plus earlier running ones already fill n_trials; a re-queued
    trial that is surplus is queued again, so that its parameters are not lost."""
    finished, ahead = counts(study, ahead_of=trial.number)
    if finished + ahead < n_trials:
        return False
    fixed = study._storage.get_trial_system_attrs(trial._trial_id).get("fixed_params")
    if fixed:
        study.enqueue_trial(fixed, skip_if_exists=False)
    return True


def earlier_result(study: optuna.Study, trial: optuna.Trial, setting: dict, fingerprint: str,
                   poll_interval: float,
                   canonical: Callable[[dict, dict], dict] = lambda setting, _used: setting
                   ) -> FrozenTrial | None:
    """A finished trial of the same setting on this fingerprint (waiting for a running one);
    `canonical(setting, calibration_used)`: the computation a setting makes with what a trial
    recorded it ran with ({}: this worker's), `accelerators.canonical_setting`, so that a
    different setting of the same computation counts as the same."""
    key = setting_key(canonical(setting, {}))
    while True:
        running_twin = False
        for other in study.get_trials(deepcopy=False, states=(*studies.FINISHED, TrialState.RUNNING)):
            attrs = other.user_attrs
            if other.number == trial.number or attrs.get("fingerprint") != fingerprint or setting_key(
                    canonical(attrs.get("setting", {}), attrs.get("calibration_used", {}))) != key:
                continue
            if other.state in studies.FINISHED and "constraints" in other.user_attrs:
                return other
            if other.state == TrialState.RUNNING and other.number < trial.number:
                running_twin = True
        if not running_twin:
            return None
        time.sleep(poll_interval)
        optuna.storages.fail_stale_trials(study)


def copy_result(study: optuna.Study, trial: optuna.Trial, previous: FrozenTrial, setting: dict):
    """Copy a finished trial's result (Optuna's FAQ pattern) instead of measuring again; returns
    its values, or raises TrialPruned like the trial it copies. `setting`: this trial's own,
    which stays its record where it differs from the copied one's (the same computation)."""
    for key, value in previous.user_attrs.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("reused_from", previous.number)
    why = "same setting, same device"
    if setting_key(setting) != setting_key(previous.user_attrs.get("setting", {})):
        why = "same steps skipped, same device: the same computation"
        trial.set_user_attr("setting", setting)
    trial.set_user_attr("reused_why", why)
    write_constraints(study, trial, previous.user_attrs["constraints"])
    logger.info("trial %d reuses trial %d (%s)", trial.number, previous.number, why)
    if previous.state == TrialState.PRUNED:
        raise optuna.TrialPruned(f"same setting as trial {previous.number}, which was pruned")
    return previous.values if len(previous.values) > 1 else previous.values[0]
