"""A failed trial is queued again with its parameters only, never with what its run wrote: a
retry that inherited its worker looked started, so one popped just before its worker lost the
database was never judged an orphan and stayed RUNNING, and the other workers waited on it."""

from __future__ import annotations

import datetime
import re
import time
import warnings

import optuna
import sqlalchemy
import sqlalchemy.orm
from optuna.trial import TrialState

from optsearch.optimize import recovery, sharing
from optsearch.storage.proxy import BEAT_ATTR
from optsearch.storage.rdb import open_storage
from optsearch.storage.record import write_constraints


def run_that_wrote_a_record(study: optuna.Study) -> optuna.Trial:
    """A trial as a worker leaves it when the database goes away while it tells the result."""
    trial = study.ask()
    trial.suggest_int("deepcache.cache_interval", 1, 5)
    for key, value in {"worker": "host:1", "fingerprint": "cpu", "setting": {"deepcache": {}},
                       "speedup": 1.5, "fail_reason": "half told"}.items():
        trial.set_user_attr(key, value)
    write_constraints(study, trial, {"quality": 0.2})
    study._storage.set_trial_system_attr(trial._trial_id, BEAT_ATTR, 0.0)
    return trial


def only_retry(study: optuna.Study, of: optuna.Trial) -> optuna.trial.FrozenTrial:
    [retry] = [t for t in study.get_trials() if t.system_attrs.get("retry_history", [])[-1:] == [of.number]]
    return retry


def test_a_retry_carries_its_parameters_and_nothing_its_failed_run_wrote(tmp_path):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/s.db"))
    first = run_that_wrote_a_record(study)
    assert recovery.fail_and_requeue(study, first._trial_id)
    retry = only_retry(study, first)
    assert retry.state == TrialState.WAITING and retry.params == first.params
    assert retry.user_attrs == {}
    assert set(retry.system_attrs) == {"fixed_params", "failed_trial", "retry_history"}
    assert retry.system_attrs["fixed_params"] == first.params  # as the queue's readers read it

    popped = study.ask()  # the retry, RUNNING; its own constraint is the one kept
    assert popped.number == retry.number
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna's "already set" warning would fail here
        write_constraints(study, popped, {"quality": -0.1})
    assert study._storage.get_trial(popped._trial_id).system_attrs["constraints:quality"] == -0.1


def test_a_popped_retry_whose_worker_lost_the_database_is_failed_as_an_orphan(tmp_path):
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/s.db"))
    first = run_that_wrote_a_record(study)
    recovery.fail_and_requeue(study, first._trial_id)
    popped = study.ask()  # popped by a worker that lost the database before its objective began
    recovery.OrphanWatch(grace_period=0).fail_orphans(study)
    assert study._storage.get_trial(popped._trial_id).state == TrialState.FAIL
    assert only_retry(study, popped).state == TrialState.WAITING  # and queued once more


def test_a_stale_trial_is_requeued_by_the_heartbeat_without_its_record(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage)
    dead = run_that_wrote_a_record(study)
    storage.record_heartbeat(dead._trial_id)
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    retry = only_retry(study, dead)
    assert retry.state == TrialState.WAITING and retry.user_attrs == {}
    assert "constraints:quality" not in retry.system_attrs and BEAT_ATTR not in retry.system_attrs


def test_a_trial_a_recovery_could_not_give_back_is_given_back_at_the_next_step(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=None)
    study = optuna.create_study(storage=storage)
    stuck = study.ask()
    stuck.suggest_int("deepcache.cache_interval", 1, 5)
    outages = recovery.DatabaseOutages(storage)
    outages.left.append(stuck._trial_id)  # as `recover` leaves it when the database is still away
    outages.give_back_left(study)
    assert storage.get_trial(stuck._trial_id).state == TrialState.FAIL
    assert only_retry(study, stuck).params == stuck.params and outages.left == []
    outages.left.append(stuck._trial_id)  # already given back: not queued twice
    outages.give_back_left(study)
    assert len([t for t in study.get_trials() if t.state == TrialState.WAITING]) == 1


def test_a_started_trial_that_never_beat_is_an_orphan_once_its_grace_period_is_over(tmp_path):
    """Its worker died before its first heartbeat reached the database (the first beat failed,
    or the worker was killed at once): Optuna's heartbeat never judges it, and it named its
    worker, so before it stayed RUNNING and every other worker waited on it for good."""
    storage = open_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(storage=storage)
    silent, beating = study.ask(), study.ask()
    for trial in (silent, beating):
        trial.suggest_int("deepcache.cache_interval", 1, 5)
        trial.set_user_attr("worker", "host:1")
    storage.record_heartbeat(beating._trial_id)
    watch = recovery.OrphanWatch(grace_period=2)
    watch.fail_orphans(study)  # within its grace period: left alone
    assert storage.get_trial(silent._trial_id).state == TrialState.RUNNING
    time.sleep(2.2)
    watch.fail_orphans(study)
    assert storage.get_trial(silent._trial_id).state == TrialState.FAIL
    assert only_retry(study, silent).state == TrialState.WAITING
    assert storage.get_trial(beating._trial_id).state == TrialState.RUNNING  # the heartbeat's to judge

    unbeaten = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/h.db",
                                                        heartbeat_interval=None))
    started = unbeaten.ask()
    started.set_user_attr("worker", "host:1")
    recovery.OrphanWatch(grace_period=0).fail_orphans(unbeaten)  # no heartbeat to ask: left
    assert unbeaten._storage.get_trial(started._trial_id).state == TrialState.RUNNING


def test_an_orphan_is_timed_by_the_judging_workers_clock_not_by_its_creators(tmp_path):
    """A trial's datetime_start is the local time of the worker that made it: on a machine in
    another time zone it is hours off. Made "ahead", an orphan stayed RUNNING hours past its grace
    period; made "behind", a live trial whose first beat had not landed looked hours old and was
    failed at once. Both are now timed from when this worker first saw them unbeaten."""
    storage = open_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(storage=storage)
    ahead, behind = study.ask(), study.ask()
    with sqlalchemy.orm.Session(storage.engine) as session:  # as their makers' clocks wrote them
        for trial, hours in ((ahead, 5), (behind, -5)):
            session.execute(sqlalchemy.text("UPDATE trials SET datetime_start = :start "
                                            "WHERE trial_id = :id"),
                            {"start": datetime.datetime.now() + datetime.timedelta(hours=hours),
                             "id": trial._trial_id})
        session.commit()
    watch = recovery.OrphanWatch(grace_period=1)
    watch.fail_orphans(study)  # "behind" looks 5 hours old: still within its grace period here
    assert [storage.get_trial(t._trial_id).state for t in (ahead, behind)] == [TrialState.RUNNING] * 2
    time.sleep(1.1)
    watch.fail_orphans(study)  # "ahead" starts 5 hours from now: an orphan all the same
    assert [storage.get_trial(t._trial_id).state for t in (ahead, behind)] == [TrialState.FAIL] * 2


class Lines:
    """A progress bar's `write`, kept."""

    def __init__(self):
        self.lines: list[str] = []

    def write(self, line: str) -> None:
        self.lines.append(line)


def test_how_long_a_trial_waited_on_has_run_is_read_in_utc_not_in_its_makers_zone(tmp_path):
    """A worker waiting on the study's last trials says how long each has run. That read
    datetime_start, the local time of the machine that made the trial: made 5 hours "ahead" it
    said "running -18000 s", made "behind" "running 5 h". The worker that starts a trial now
    writes when, in UTC, and the notice reads that."""
    storage = open_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=None)
    study = optuna.create_study(storage=storage)
    trials = [study.ask() for _ in range(2)]
    for trial, hours in zip(trials, (5, -5), strict=True):
        sharing.mark_started(trial, f"gpu-{hours}:1")
        with sqlalchemy.orm.Session(storage.engine) as session:  # as its maker's clock wrote it
            session.execute(sqlalchemy.text("UPDATE trials SET datetime_start = :start WHERE trial_id = :id"),
                            {"start": datetime.datetime.now() + datetime.timedelta(hours=hours),
                             "id": trial._trial_id})
            session.commit()
    bar = Lines()
    sharing.WaitNotice().say(study, bar, "here:1")
    [line] = bar.lines
    assert re.search(r"trial 0 \(gpu-5:1, running (<1|\d) s\); trial 1 \(gpu--5:1, running (<1|\d) s\)",
                     line), line
    frozen = study.get_trials(deepcopy=False)
    assert all(0 <= sharing.running_seconds(t) < 60 for t in frozen)
