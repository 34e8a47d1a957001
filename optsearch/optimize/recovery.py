"""Keeping a shared study consistent when workers die, lose the database or are interrupted.

Optuna's heartbeat fails the trials of dead workers and its stale-trial callback re-queues them.
What it does not cover is here: trials that never recorded a beat (orphans), a trial this worker
must give back after losing the database or on Ctrl-C, heartbeat threads an interrupt left, why a
trial failed, and a worker whose trials keep failing.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator

import optuna
import sqlalchemy
import torch
from optuna.storages._heartbeat import HeartbeatThread
from optuna.trial import TrialState

from optsearch.errors import StorageError, StorageUnreachable, UsageError, error_text, first_line
from optsearch.formatting import format_setting
from optsearch.storage.notes import failure_note, write_trial_note
from optsearch.storage.rdb import DATABASE_ERRORS
from optsearch.storage.requeue import RetryWithoutRecord

logger = logging.getLogger(__name__)
OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError, MemoryError)
MAX_DATABASE_ERRORS = 20  # consecutive; a database down for longer ends the worker
MAX_FAILED_IN_A_ROW = 5  # a worker's trials failed with a reason, consecutive: it stops


def fail_and_requeue(study: optuna.Study, trial_id: int) -> bool:
    """Fail a trial that nobody runs any more and queue its parameters again, as the heartbeat's
    stale-trial callback does for dead workers. False if it had already ended."""
    storage = study._storage
    if storage.get_trial(trial_id).state == TrialState.RUNNING:
        try:
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker was first
            return False
    failed = storage.get_trial(trial_id)
    if failed.state != TrialState.FAIL:
        return False
    RetryWithoutRecord(max_retry=None)(study, failed)
    return True


def backend(storage: optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """The storage a study's cache wraps (Optuna wraps an RDB storage in its `_CachedStorage`)."""
    return getattr(storage, "_backend", storage)


class OrphanWatch:
    """Fails and re-queues RUNNING trials that never recorded a heartbeat within the grace period.

    Optuna's heartbeat only judges trials that recorded a beat; a trial created just before its
    worker lost the database (or died) may have none, and would stay RUNNING forever: the other
    workers would wait on it for good. Without a heartbeat to ask (none configured), a trial
    whose objective started (it names its worker) is left alone.

    A trial's age is timed by this process's clock from when it first saw the trial unbeaten,
    not from its `datetime_start`: that is the creating worker's local time, hours off on a
    machine in another time zone (a trial made an hour "ahead" stayed RUNNING an hour more; one
    made behind looked old, and a live trial whose first beat had not landed was failed).
    """

    def __init__(self, grace_period: float) -> None:
        self.grace_period = grace_period
        self.first_seen: dict[int, float] = {}  # trial id -> monotonic seconds

    def fail_orphans(self, study: optuna.Study) -> None:
        storage = backend(study._storage)
        ask = getattr(storage, "running_with_heartbeat", None) if storage.get_heartbeat_interval() else None
        beating = ask(study._study_id) if ask is not None else None
        now = time.monotonic()
        unbeaten = set()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if "worker" in trial.user_attrs and (beating is None or trial._trial_id in beating):
                continue
            unbeaten.add(trial._trial_id)
            seen = self.first_seen.setdefault(trial._trial_id, now)
            if now - seen >= self.grace_period and fail_and_requeue(study, trial._trial_id):
                logger.warning("trial %d never started measuring: failed and re-queued", trial.number)
        self.first_seen = {trial_id: seen for trial_id, seen in self.first_seen.items()
                           if trial_id in unbeaten}


def ended_by_others(study: optuna.Study, trial: optuna.Trial | None, error: Exception) -> bool:
    """Our trial was failed (and re-queued) by another worker that judged its heartbeat stale:
    its result cannot be told any more (`error` is Optuna's "Cannot tell a FAIL trial.")."""
    if trial is None or not str(error).startswith(("Cannot tell a", "Trial#")):
        return False
    state = study._storage.get_trial(trial._trial_id).state
    if state == TrialState.RUNNING:
        return False
    logger.warning("trial %d was ended (%s) by another worker while this one measured it "
                   "(heartbeat judged stale); going on with the next trial", trial.number, state.name)
    return True


def raise_if_study_deleted(study: optuna.Study, error: BaseException) -> None:
    """A worker whose study was deleted under it (`study delete --force`) stops with one line."""
    if caused_by_database(error):
        return  # the database is away: nothing can be known about the study until it is back
    try:
        names = [s.study_name for s in study._storage.get_all_studies()]
    except Exception:  # noqa: BLE001 - the original error is the one to report
        return
    if study.study_name not in names:
        raise StorageError(f"study {study.study_name!r} was deleted while this worker ran; "
                           "its running trial is lost, the worker stops") from None


def caused_by_database(error: BaseException | None) -> bool:
    """A database error, or an error raised while one was being handled (Optuna's own clean-up
    after a failed `tell` can end in an AssertionError whose context is the database error)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DATABASE_ERRORS):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def out_of_memory_reason(batch_size: int, setting: dict, error: BaseException) -> str:
    """Why a trial ran out of memory, as it records it: the batch, the setting, and what the
    allocator tried and had (`error_text`)."""
    return f"out of memory at batch size {batch_size} with {format_setting(setting)}: {error_text(error)}"


@contextlib.contextmanager
def failure_recorded(trial: optuna.Trial) -> Iterator[None]:
    """A trial that raises where no check foresaw it (or runs out of memory calibrating) records
    the one-line reason, with its setting once drawn, for `study show`, the trial lines and the
    failure streak, before Optuna fails it, unless it holds one already (out of memory measuring,
    an implausible figure); and every failed trial's note in the dashboard says it. Nothing is
    written where the database itself failed."""
    try:
        yield
    except optuna.TrialPruned:  # stopped early, or a copy of a trial that was: not a failure
        raise
    except Exception as error:
        if not caused_by_database(error):
            try:
                attrs = trial.user_attrs
                if "fail_reason" not in attrs:
                    drawn = f" with {format_setting(attrs['setting'])}" if attrs.get("setting") else ""
                    said = error_text(error)
                    attrs["fail_reason"] = f"{type(error).__name__}: {said}{drawn}"
                    trial.set_user_attr("fail_reason", attrs["fail_reason"])
                write_trial_note(trial.study, trial._trial_id, failure_note(trial.number, attrs))
            except Exception:  # noqa: BLE001 - the original error is the one to report
                logger.debug("could not record why trial %d failed", trial.number, exc_info=True)
        raise


class FailureStreak:
    """Stops a worker whose trials keep failing with a reason (out of memory at every setting, an
    implausible figure each time): failed trials do not count toward n_trials, so such a worker
    would fail trial after trial for good. Trials failed without a reason (ended by another
    worker, interrupted: re-queued) neither count nor break the streak."""

    def __init__(self, limit: int = MAX_FAILED_IN_A_ROW):
        self.limit = limit
        self.failed = 0

    def count(self, study: optuna.Study, trial: optuna.Trial | None) -> None:
        """Count the trial just told; UsageError (exit 2) once `limit` failed in a row."""
        if trial is None:
            return
        told = study._storage.get_trial(trial._trial_id)
        reason = told.user_attrs.get("fail_reason")
        if told.state != TrialState.FAIL:
            self.failed = 0
        elif reason:
            self.failed += 1
        if self.failed < self.limit:
            return
        memory = "out of memory" in reason.lower() or reason.startswith(("OutOfMemoryError", "MemoryError"))
        fix = ("lower prompts.batch_size, or start workers with --halve-batch-on-oom" if memory
               else "see `study show` for each trial's reason")
        raise UsageError(f"the last {self.limit} trials of this worker failed (the last, trial "
                         f"{told.number}: {reason}); it stops, as failed trials do not count toward "
                         f"search.n_trials: {fix}")


class DatabaseOutages:
    """Counts consecutive database errors; waits and reconnects after each, up to a limit."""

    def __init__(self, storage, limit: int = MAX_DATABASE_ERRORS):
        self.storage = storage
        self.limit = limit
        self.count = 0
        self.left: list[int] = []  # trials a recovery could not give back while the database was away

    def recovered(self) -> None:
        self.count = 0

    def recover(self, error: Exception, study: optuna.Study, current: optuna.Trial | None) -> None:
        """Wait, reconnect (pool pre-ping), and give back the trial this worker was measuring;
        re-raise once the database has been down for `limit` attempts."""
        self.count += 1
        cause = error
        while cause.__context__ is not None and not isinstance(cause, sqlalchemy.exc.SQLAlchemyError):
            cause = cause.__cause__ or cause.__context__
        logger.warning("database error (%s: %s); reconnecting (%d/%d)", type(cause).__name__,
                       first_line(cause), self.count, self.limit)
        if self.count >= self.limit:  # one line, and exit 75: the same worker may run later
            raise StorageUnreachable(
                f"the storage stopped answering ({type(cause).__name__}: {first_line(cause)}) "
                f"{self.limit} times in a row: this worker stops (exit 75: start it again once "
                "the storage is up; its trial is re-queued)") from error
        self.storage.reset_session()
        time.sleep(min(10.0, 0.25 * 2 ** self.count))
        if current is None:
            return
        try:
            fail_and_requeue(study, current._trial_id)  # this process no longer runs it
        except DATABASE_ERRORS:  # still down: given back at the next step
            self.left.append(current._trial_id)

    def give_back_left(self, study: optuna.Study) -> None:
        """Fail and re-queue the trials `recover` could not give back. Until then they are RUNNING,
        and the grace period is no backstop for a trial whose heartbeat never reached the database."""
        while self.left:
            if study._storage.get_trial(self.left[0]).state == TrialState.RUNNING:
                fail_and_requeue(study, self.left[0])
            self.left.pop(0)


def retried(action: Callable[[], object], storage, attempts: int = 3):
    """`action()` (writes to the study), again on a fresh connection after a database error. For
    a measured trial's record: lost, it would cost the whole measurement (the trial would be
    failed, re-queued and measured again). `action` must be safe to repeat."""
    for attempt in range(attempts - 1):
        try:
            return action()
        except Exception as error:
            if not caused_by_database(error):
                raise
            logger.warning("database error while storing a trial's record (%s); retrying",
                           first_line(error))
            reset = getattr(backend(storage), "reset_session", None)  # ours (storage/rdb.py, proxy.py)
            if reset is not None:
                reset()
            time.sleep(0.5 * 2 ** attempt)
    return action()  # the last try: its error is the one raised


def stop_orphaned_heartbeats() -> None:
    """Stop Optuna heartbeat threads an interrupt left running. A Ctrl-C while Optuna starts one
    (Thread.start waits for the new thread) skips its `with` block's exit, and Python's shutdown
    would then wait for that non-daemon thread forever."""
    for thread in threading.enumerate():
        if getattr(thread, "_target", None) is HeartbeatThread._record_heartbeat:
            thread._args[2].set()  # its stop event


class Interrupts:
    """SIGINT and SIGTERM end a worker like Ctrl-C (the running trial is failed and re-queued),
    except while Optuna creates a trial and starts its heartbeat, or tells it: an interrupt there
    would leave a RUNNING trial that nobody fails, so it is held until the objective has the
    trial, or until the tell is done. A second signal while one is held is not held (a stuck
    database must not make Ctrl-C useless)."""

    def __init__(self) -> None:
        self.holding = False
        self.pending = False
        self.received = False  # kept: an interrupt raised inside a GC callback is lost ("ignored")
        self.previous: dict = {}
        self.previous_unraisable = sys.unraisablehook

    def __enter__(self) -> Interrupts:
        self.received = False
        if threading.current_thread() is threading.main_thread():  # only there can Python catch them
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # a background job's stays ignored
                    self.previous[sig] = signal.signal(sig, self._handle)
            self.previous_unraisable = sys.unraisablehook
            sys.unraisablehook = self._unraisable
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self.previous_unraisable
        self.previous = {}
        if self.received and exc_type is None:  # one Python ignored: the run must not end as done
            raise KeyboardInterrupt

    def _handle(self, signum, frame) -> None:
        self.received = True
        if self.holding and not self.pending:
            self.pending = True
            return
        raise KeyboardInterrupt

    def _unraisable(self, unraisable) -> None:
        """Our own interrupt, raised where Python could not raise it (a weakref or `__del__` run
        by the garbage collector, e.g. SQLAlchemy's): it is kept in `received` and raised at the
        next check, so the traceback Python would print about it is noise to the user."""
        if self.received and unraisable.exc_type is KeyboardInterrupt:
            return
        self.previous_unraisable(unraisable)

    def hold(self) -> None:
        """From here until `release`, an interrupt waits. One received before and lost (raised
        where Python ignores exceptions: a weakref or `__del__` run by the garbage collector,
        e.g. SQLAlchemy's) is raised now, between trials."""
        self.raise_lost()
        self.holding = True

    def held_after(self, objective: Callable) -> Callable:
        """`objective`, after which an interrupt waits until `release`: Optuna tells the trial
        next, and an interrupt inside its tell would leave the trial RUNNING (Optuna's clean-up
        then reads a state never set, and its UnboundLocalError hides the interrupt)."""
        def held(trial):
            try:
                return objective(trial)
            finally:
                self.holding = True
        return held

    def raise_lost(self) -> None:
        """Raise an interrupt that came, if any: one raised where Python ignored it is lost."""
        if self.received:
            raise KeyboardInterrupt

    def checked(self, rule: Callable | None) -> Callable:
        """An early-stop rule (asked after each batch) that first raises an interrupt received
        and lost: the trial it landed in is failed and re-queued within a batch, not finished."""
        def check(partial):
            self.raise_lost()
            return rule(partial) if rule is not None else None
        return check

    def sleep(self, seconds: float) -> None:
        """Wait for other workers, unless an interrupt was received and lost."""
        self.raise_lost()
        time.sleep(seconds)

    def release(self) -> None:
        """Raise the interrupt that waited, if any (inside the objective: Optuna fails the trial)."""
        self.holding = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
