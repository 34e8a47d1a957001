"""What the workers of one study coordinate through the storage: how many trials are taken,
results that another worker already measured on the same device, and which settings are left.

A sampler repeats itself on a small space (TPE drew 20-25 distinct settings in 60 trials of
DeepCache's 28): a repeat copies the earlier result at no cost and takes none of `n_trials`, and
the worker then measures a setting drawn at random among those not measured yet (NNI's answer to
the same problem), until none is left: the space is exhausted and the study is done."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from optsearch.accelerators import normalize_setting, same_computation_why
from optsearch.formatting import format_duration
from optsearch.optimize import study as studies
from optsearch.optimize.objectives import setting_key
from optsearch.optimize.samplers import trial_seed
from optsearch.optimize.space import suggest_setting
from optsearch.storage.record import is_copy, utc_now, write_constraints
from optsearch.study_spec import StudySpec

logger = logging.getLogger(__name__)


class SurplusTrial(Exception):
    """Another worker already holds the last slot of the study's n_trials."""


UNMEASURED_DRAWS = 2000  # a space with one setting in 500 left unmeasured ends with 2 % chance


def counts(study: optuna.Study, ahead_of: int | None = None) -> tuple[int, int]:
    """(measured, running) trials, copies not counted; with `ahead_of`, only running trials
    numbered below it."""
    trials = study.get_trials(deepcopy=False, states=(*studies.FINISHED, TrialState.RUNNING))
    finished = sum(t.state in studies.FINISHED and not is_copy(t) for t in trials)
    running = sum(t.state == TrialState.RUNNING and (ahead_of is None or t.number < ahead_of)
                  for t in trials)
    return finished, running


WAIT_NOTICE_SECONDS = 300.0


class WaitNotice:
    """What a worker waiting for the study's last trials (held by other workers) says: which
    trials, whose, and for how long they have run, when it starts waiting and every 5 minutes
    after. A worker that waits in silence looks hung, and one whose trial is stuck goes unseen."""

    def __init__(self, every: float = WAIT_NOTICE_SECONDS):
        self.every = every
        self.said: float | None = None

    def say(self, study: optuna.Study, bar, worker_id: str) -> None:
        if self.said is not None and time.monotonic() - self.said < self.every:
            return
        self.said = time.monotonic()
        held = [f"trial {t.number} ({t.user_attrs.get('worker', 'not started yet')}, running "
                f"{format_duration(running_seconds(t))})"
                for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.datetime_start is not None]
        if held:
            bar.write(f"{worker_id}: waiting for the study's last trials, which other workers run: "
                      + "; ".join(held))


def mark_started(trial: optuna.Trial, worker_id: str) -> None:
    """Whose trial this is (a trial with no "worker" is an orphan if it never beats) and when it
    started, in UTC: the wait notice of a worker in any time zone reads how long it has run."""
    trial.set_user_attr("worker", worker_id)
    trial.set_user_attr("started", utc_now())


def running_seconds(trial: FrozenTrial) -> float:
    """How long a running trial has run: from the UTC time its worker wrote when it started it.
    Optuna's datetime_start is the creating machine's local time, hours off in another zone; it
    stands in only for a trial whose worker has not written yet (or an older release's)."""
    if "started" in trial.user_attrs:
        started = datetime.datetime.fromisoformat(trial.user_attrs["started"])
        return (datetime.datetime.now(datetime.UTC) - started).total_seconds()
    return (datetime.datetime.now() - trial.datetime_start).total_seconds()


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
                   canonical: Callable[[dict, dict], dict] = lambda setting, _used: setting,
                   recover: Callable[[], None] | None = None) -> FrozenTrial | None:
    """A finished trial of the same setting on this fingerprint (waiting for a running one, and
    for an earlier running trial to write what it runs: otherwise two workers that start one
    setting at once both measure it);
    `canonical(setting, calibration_used)`: the computation a setting makes with what a trial
    recorded it ran with ({}: this worker's), `accelerators.canonical_setting`, so that a
    different setting of the same computation counts as the same. Both sides are keyed with the
    calibration the device's trials recorded (`recorded_calibration`). `recover()`, asked at each
    wait, ends the trials waited on whose worker died (by default those the heartbeat judges
    stale; the worker adds orphans, which never beat: one waited on forever held every worker)."""
    while True:
        trials = study.get_trials(deepcopy=False, states=(*studies.FINISHED, TrialState.RUNNING))
        recorded = recorded_calibration(trials, fingerprint)
        key = setting_key(canonical(setting, recorded))
        running_twin = False
        for other in trials:
            attrs = other.user_attrs
            if other.state == TrialState.RUNNING and other.number < trial.number \
                    and "fingerprint" not in attrs:  # just started: what it runs is not written
                running_twin = True  # yet, and it may be this (two workers popped one setting)
                continue
            used = {**recorded, **attrs.get("calibration_used", {})}
            if other.number == trial.number or attrs.get("fingerprint") != fingerprint \
                    or setting_key(canonical(attrs.get("setting", {}), used)) != key:
                continue
            if other.state in studies.FINISHED and "constraints" in other.user_attrs:
                return other
            if other.state == TrialState.RUNNING and other.number < trial.number:
                running_twin = True
        if not running_twin:
            return None
        time.sleep(poll_interval)
        if recover is not None:
            recover()
        else:
            optuna.storages.fail_stale_trials(study)


def recorded_calibration(trials: list[FrozenTrial], fingerprint: str) -> dict:
    """The calibration the trials on this fingerprint recorded they ran with, family by family.
    A family's computation may be told by its calibration (ToMe's token counts): a worker that has
    not measured it yet keys a setting by its parameters, a trial that ran keys it by what it
    computed, and the two never meet, so one setting was measured twice. On one device the
    calibration is one (the first stored is adopted), so what a trial recorded stands for all."""
    recorded: dict[str, dict] = {}
    for trial in trials:
        if trial.user_attrs.get("fingerprint") == fingerprint:
            for family, data in trial.user_attrs.get("calibration_used", {}).items():
                recorded.setdefault(family, data)
    return recorded


def copy_result(study: optuna.Study, trial: optuna.Trial, previous: FrozenTrial, setting: dict):
    """Copy a finished trial's result (Optuna's FAQ pattern) instead of measuring again; returns
    its values, or raises TrialPruned like the trial it copies. `setting`: this trial's own,
    which stays its record where it differs from the copied one's (the same computation)."""
    for key, value in previous.user_attrs.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("reused_from", previous.number)
    why = "same setting, same device"
    if setting_key(setting) != setting_key(previous.user_attrs.get("setting", {})):
        why = same_computation_why(setting, previous.user_attrs.get("setting", {}))
        trial.set_user_attr("setting", setting)
    trial.set_user_attr("reused_why", why)
    write_constraints(study, trial, previous.user_attrs["constraints"])
    logger.info("trial %d reuses trial %d (%s)", trial.number, previous.number, why)
    if previous.state == TrialState.PRUNED:
        raise optuna.TrialPruned(f"same setting as trial {previous.number}, which was pruned")
    return previous.values if len(previous.values) > 1 else previous.values[0]


def taken(trials: list[FrozenTrial], fingerprint: str, key: Callable[[dict, dict], str]) -> set[str]:
    """The computations (`key(setting, calibration_used)`) that trials on this fingerprint
    measured, are measuring or failed at."""
    states = (*studies.FINISHED, TrialState.RUNNING, TrialState.FAIL)
    return {key(t.user_attrs["setting"], t.user_attrs.get("calibration_used", {}))
            for t in trials if t.state in states
            and t.user_attrs.get("fingerprint") == fingerprint and "setting" in t.user_attrs}


def waiting(trials: list[FrozenTrial], draw: Callable[[optuna.Trial], dict],
            key: Callable[[dict, dict], str]) -> set[str]:
    """The computations of the trials waiting in the study's queue (`enqueue_trial`), each
    keyed as `draw` makes its setting from the parameters it was queued with."""
    probe = optuna.create_study()
    keys = set()
    for queued in (t for t in trials if t.state == TrialState.WAITING):
        probe.enqueue_trial(queued.system_attrs.get("fixed_params", {}), skip_if_exists=False)
        trial = probe.ask()
        keys.add(key(draw(trial), {}))
        probe.tell(trial, state=TrialState.FAIL)
    return keys


def unmeasured_params(tried: set[str], draw: Callable[[optuna.Trial], dict], key: Callable[[dict, dict], str],
                      seed: int | None = None, draws: int = UNMEASURED_DRAWS) -> dict | None:
    """The parameters (as Optuna names them, for `enqueue_trial`) of a setting whose computation
    is not in `tried` (`taken`), drawn at random: `draw(trial)` samples a setting from the space as a worker
    does. None when `draws` draws found none: the space is tried through."""
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(draws):
        trial = probe.ask()
        if key(draw(trial), {}) not in tried:
            return trial.params
        probe.tell(trial, state=TrialState.FAIL)
    return None


def queue_unmeasured(study: optuna.Study, spec: StudySpec, fingerprint: str, auto: dict,
                     canonical: Callable[[dict, dict], dict], record: dict) -> bool:
    """Queue a setting not tried on this fingerprint for the next trial; False when none is
    left, recording that the space is exhausted there (with `record`: who found it)."""
    trials = study.get_trials(deepcopy=False)  # read once: what is taken, queued and recorded
    recorded = recorded_calibration(trials, fingerprint)

    def key(setting: dict, used: dict) -> str:
        return setting_key(canonical(setting, {**recorded, **used}))

    def draw(trial: optuna.Trial) -> dict:
        return normalize_setting(suggest_setting(trial, spec, auto))

    tried = taken(trials, fingerprint, key)
    queued = waiting(trials, draw, key)  # next in line anyway: another of them would be a copy
    seed = spec.search.seed and trial_seed(spec.search.seed, len(study.trials))
    params = unmeasured_params(tried | queued, draw, key, seed)
    if params is not None:
        study.enqueue_trial(params, skip_if_exists=False)
        return True
    if queued - tried:  # the last unmeasured computations wait in the queue already
        return True
    record = {"settings": len(tried), "draws": UNMEASURED_DRAWS, "n_trials": spec.search.n_trials, **record}
    studies.save_exhausted(study, fingerprint, record)
    logger.info("%s", studies.exhausted_text(record))
    return False
