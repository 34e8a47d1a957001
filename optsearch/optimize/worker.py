"""The worker: joins a study, times its own baseline, and runs trials until the study is done.

Any number of workers (processes or machines) may join one study. Each trial samples a setting,
measures it batch by batch against the worker's baseline (stopping early when the rule in
early_stop.py says it cannot be the answer), and stores its record (storage/record.py). A worker
that dies leaves its trial RUNNING; Optuna's heartbeat fails it after the grace period and the
storage's stale-trial callback re-queues it with the same parameters (recovery.py). SIGINT and
SIGTERM fail the running trial, re-queue it, and exit with 130."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna
from tqdm.auto import tqdm

from optsearch.accelerators import canonical_setting, combo_name, execution_device, normalize_setting, tome
from optsearch.measure.evaluate import Comparison, Evaluator, evaluator_from_spec
from optsearch.measure.faults import fault_from_env
from optsearch.measure.fingerprint import fingerprint
from optsearch.optimize import recovery, sharing
from optsearch.optimize import study as studies
from optsearch.optimize.baseline import BaselineKeeper
from optsearch.optimize.early_stop import rule_for
from optsearch.optimize.estimate import print_estimate
from optsearch.optimize.plausible import ImplausibleSpeedup, measure_plausibly
from optsearch.optimize.recovery import OUT_OF_MEMORY
from optsearch.optimize.space import computations, suggest_setting, trials_possible
from optsearch.optimize.tell import record_trial
from optsearch.optimize.winner import mark_winner
from optsearch.storage.artifacts import open_artifact_store
from optsearch.storage.notes import trial_line
from optsearch.storage.rdb import GRACE_PERIOD, HEARTBEAT_INTERVAL, open_storage

logger = logging.getLogger(__name__)


@dataclass
class WorkerOptions:
    device: str | None = None
    n_trials: int | None = None  # this worker's own limit
    timeout: float | None = None  # seconds from `started`; no new trial starts after it
    progress: bool = True  # progress bars
    trial_lines: bool = True  # one line per finished trial (also under --quiet: a log's record)
    heartbeat_interval: int = HEARTBEAT_INTERVAL
    grace_period: int = GRACE_PERIOD
    poll_interval: float = 2.0
    artifact_dir: str | None = None  # overrides the spec's [artifacts] path
    halve_batch_on_oom: bool = False  # retry an out-of-memory trial at half the batch size
    started: float = field(default_factory=time.monotonic)  # when the command began
    stop_rule: Callable = rule_for  # (spec, finished, fingerprint, baseline id, combo=) -> rule


class Worker:
    """One process that evaluates trials of one study on one device."""

    def __init__(self, storage_url: str | None, study_name: str, options: WorkerOptions | None = None,
                 evaluator: Evaluator | None = None):
        """`evaluator`: one already loaded for this study's spec (`optsearch run` loads it first)."""
        self.options = options or WorkerOptions()
        self.storage = open_storage(storage_url, self.options.heartbeat_interval, self.options.grace_period)
        self.study, self.spec = studies.load_study(self.storage, study_name)
        # Load everything that can fail before writing anything to the study.
        evaluator = evaluator or evaluator_from_spec(self.spec, self.options.device, self.options.progress)
        self.host, self.worker_id = (host := socket.gethostname()), f"{host}:{os.getpid()}"
        device_id, _ = fingerprint(evaluator.pipe, evaluator.config.batch_size)
        evaluator = evaluator.derive(  # with what this study measured on this device (MagCache)
            fault=fault_from_env(), calibration=studies.calibration(self.study, device_id),
            on_calibrated=self._calibrated, stored=lambda: studies.calibration(self.study, self.fingerprint))
        artifacts = open_artifact_store(self.options.artifact_dir or self.spec.artifacts.path)
        self.baselines = BaselineKeeper(self.study, self.spec, evaluator, artifacts, self.worker_id,
                                        self.host, str(execution_device(evaluator.pipe)),
                                        os.environ.get("CUDA_VISIBLE_DEVICES"))
        self.device = self.baselines.facts["device"]  # its name: a halved batch keeps it
        self.outages = recovery.DatabaseOutages(self.storage)
        self.failures = recovery.FailureStreak()
        self.orphans = recovery.OrphanWatch(self.options.grace_period)
        self.current: optuna.Trial | None = None  # the trial being measured, until it is told
        self.interrupts = recovery.Interrupts()
        self.trials_run = 0  # trials this worker measured (copies of earlier results are free)
        self.repeated = False  # the last trial copied a measured setting: queue an unmeasured one
        self.waits = sharing.WaitNotice()  # says which trials of other workers this one waits on

    def _calibrated(self, family: str, data: dict) -> None:
        """Store what a family measured here for every worker on this device; say when the
        space searches ToMe where this UNet has no attention."""
        studies.save_calibration(self.study, self.fingerprint, family, data)
        values = self.spec.searched_values("tome").get("max_downsample", []) if family == "tome" else []
        if warning := tome.idle_warning(data, values):
            print(f"{self.worker_id}: {warning}", flush=True)

    @property
    def fingerprint(self) -> str:
        return self.baselines.fingerprint

    @property
    def evaluator(self) -> Evaluator:
        """The evaluator trials run on: the baseline keeper's, which changes with the batch size."""
        return self.baselines.evaluator

    def run(self) -> int:
        """Run trials until the study has n_trials finished ones, or this worker's own limit."""
        if exhausted := studies.exhausted(self.study).get(self.fingerprint):  # no baseline to time
            logger.info("%s", studies.exhausted_text(exhausted))
            return 0
        with self.interrupts:
            try:
                baseline = self.baselines.ensure_fitting(self.trials_run, self.options.halve_batch_on_oom)
                possible = trials_possible(self.spec, computations(self.spec, self.evaluator.calibration))
                remaining = max(0, possible - sharing.counts(self.study)[0])
                print_estimate(self.worker_id, baseline, remaining, self.evaluator, self.spec, self.study)
                self._loop()
            except KeyboardInterrupt:
                if self.current is not None:  # Optuna failed it: queue its parameters again
                    recovery.fail_and_requeue(self.study, self.current._trial_id)
                recovery.stop_orphaned_heartbeats()
                raise
        return self.trials_run

    def _loop(self) -> None:
        target = self.spec.search.n_trials
        with tqdm(total=target, initial=min(sharing.counts(self.study)[0], target), unit="trial",
                  desc=f"trials {self.study.study_name}", disable=not self.options.progress) as bar:
            while not self._own_limit_reached():
                try:
                    if not self._step(target, bar):
                        break
                    self.outages.recovered()
                except Exception as error:
                    recovery.raise_if_study_deleted(self.study, error)
                    if not recovery.caused_by_database(error):
                        raise
                    self.outages.recover(error, self.study, self.current)
            bar.update(min(sharing.counts(self.study)[0], target) - bar.n)  # the last trial too

    def _own_limit_reached(self) -> bool:
        options = self.options
        return (options.n_trials is not None and self.trials_run >= options.n_trials) or \
            (options.timeout is not None and time.monotonic() - options.started > options.timeout)

    def _step(self, target: int, bar) -> bool:
        """Run one trial, or wait for others' last trials; False when the study is done."""
        self._recover()
        finished, running = sharing.counts(self.study)
        bar.n = min(finished, target)
        bar.refresh()
        if finished >= target or self.fingerprint in studies.exhausted(self.study):
            return False
        if finished + running >= target:  # the last trials belong to other workers
            self.waits.say(self.study, bar, self.worker_id)
            self.interrupts.sleep(self.options.poll_interval)
            return True
        if self.repeated:  # the sampler repeats itself: an unmeasured setting next, if any is left
            self.repeated = False
            auto = self.evaluator.auto_ranges(self.spec)
            if not sharing.queue_unmeasured(self.study, self.spec, self.fingerprint, auto, self._canonical,
                                            {"worker": self.worker_id, "device": self.device}):
                mark_winner(self.study, self.spec)  # the dashboard's study note says why it ended
                return False
        self.baselines.between_trials(self.trials_run, self.options.halve_batch_on_oom)
        self.interrupts.hold()  # until the objective holds the trial Optuna creates
        try:
            self.study.optimize(self.interrupts.held_after(self._objective), n_trials=1, gc_after_trial=False,
                                catch=(sharing.SurplusTrial, ImplausibleSpeedup, *OUT_OF_MEMORY),
                                show_progress_bar=False)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as error:
            if not recovery.ended_by_others(self.study, self.current, error):
                raise
        finally:
            self.interrupts.release()
        told, self.current = self.current, None  # told to the storage: no longer ours to re-queue
        found = mark_winner(self.study, self.spec)  # the dashboard's note and attr follow each trial
        line = told and self.options.trial_lines and trial_line(
            self.study, told._trial_id, self.spec, found.trial.number if found else None)
        if line:  # not for a slot other workers had taken (nothing measured)
            bar.write(f"{self.worker_id}: {line}")
        self.failures.count(self.study, told)  # a worker whose every trial fails stops
        return True

    def _objective(self, trial: optuna.Trial):
        self.current = trial
        self.interrupts.release()  # an interrupt from here on fails and re-queues this trial
        sharing.mark_started(trial, self.worker_id)  # first: what it runs is written next
        if sharing.is_surplus(self.study, trial, self.spec.search.n_trials):
            raise sharing.SurplusTrial("the study's n_trials are taken by other workers")
        with recovery.failure_recorded(trial):  # a failure says why (and one unforeseen stops us)
            setting = normalize_setting(suggest_setting(trial, self.spec,
                                                        self.evaluator.auto_ranges(self.spec)))
            for key, value in {"setting": setting, "combo": combo_name(setting),
                               "fingerprint": self.fingerprint, "device": self.device,
                               "host": self.host, "batch_size": self.evaluator.config.batch_size}.items():
                trial.set_user_attr(key, value)
            previous = sharing.earlier_result(  # or one of the same computation (MagCache's skips)
                self.study, trial, setting, self.fingerprint, self.options.poll_interval, self._canonical,
                recover=self._recover)
            if previous is not None:  # free, and no trial of n_trials: an unmeasured one comes next
                self.repeated = True
                return sharing.copy_result(self.study, trial, previous, setting)
            try:
                result = measure_plausibly(lambda: self._measure(trial, setting),
                                           lambda: self.baselines.retime(self.trials_run), setting,
                                           self.spec.model, trial)
            finally:
                self.trials_run += 1  # a trial that failed ran too: this worker's --n-trials counts it
            self.baselines.trial_measured()
            return record_trial(trial, result, self.spec, self.baselines)

    def _recover(self) -> None:
        """End the trials of dead workers (stale heartbeats, orphans that never beat), and ours left."""
        self.outages.give_back_left(self.study)
        optuna.storages.fail_stale_trials(self.study)
        self.orphans.fail_orphans(self.study)

    def _canonical(self, setting: dict, used: dict) -> dict:
        """The computation `setting` makes with what a trial ran with (`used`; {}: this worker's)."""
        return canonical_setting(setting, self.spec.model.steps, {**self.evaluator.calibration, **used},
                                 self.evaluator.denoising_steps_of)

    def early_stop_rule(self, combo: str):
        """The early-stop rule for the next trial, from what the study has measured so far."""
        finished = self.study.get_trials(deepcopy=False, states=studies.FINISHED)
        return self.interrupts.checked(self.options.stop_rule(
            self.spec, finished, self.fingerprint, self.baselines.baseline_id, combo=combo))

    def _measure(self, trial: optuna.Trial, setting: dict) -> Comparison:
        """Compare the setting with the baseline; on out-of-memory, fail or halve the batch size."""
        halvings = 0
        while True:
            try:
                return self.evaluator.compare(
                    setting, self.baselines.baseline, stop_when=self.early_stop_rule(combo_name(setting)),
                    keep_images=self.spec.artifacts.grid_prompts, pass_noise=self.baselines.pass_noise())
            except OUT_OF_MEMORY as error:
                recovery.release_memory()
                batch_size = self.evaluator.config.batch_size
                reason = recovery.out_of_memory_reason(batch_size, setting, error)
                logger.warning("trial %d: %s", trial.number, reason)
                if not self.options.halve_batch_on_oom or batch_size == 1:
                    trial.set_user_attr("fail_reason", reason)
                    raise
                trial.set_user_attr("batch_size", self.baselines.halve_batch(self.trials_run))
                trial.set_user_attr("oom_halvings", halvings := halvings + 1)
                trial.set_user_attr("fingerprint", self.fingerprint)
