"""The worker: joins a study, times its own baseline once, and runs trials until the study is done.

Any number of workers (processes or machines) may join one study. Each trial is one setting
measured batch by batch against the worker's baseline for its device fingerprint. A worker that
dies leaves its trial RUNNING; Optuna's heartbeat fails it after the grace period and the storage's
stale-trial callback re-queues it with the same parameters. SIGINT/SIGTERM fail the running trial,
re-queue it, and exit with 130.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import json
import logging
import math
import os
import platform
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import diffusers
import numpy as np
import optuna
import sqlalchemy
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from . import study as studies
from .accelerators import combo_name, denoiser, normalize_setting
from .artifacts import download_arrays, image_grid, open_artifact_store, upload_arrays, upload_bytes
from .dashboard import write_trial_note
from .early_stop import EarlyStop, FirstBatches, FrontPoint, PromptEffects
from .evaluate import Baseline, Comparison, Evaluator, evaluator_from_spec
from .faults import oom_fault_from_env
from .quality import Interval, unsafe_side
from .report import format_interval, trial_note
from .speedup import SpeedupInterval
from .storage import DATABASE_ERRORS, GRACE_PERIOD, HEARTBEAT_INTERVAL, open_storage

logger = logging.getLogger(__name__)
OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError, MemoryError)
MAX_DATABASE_ERRORS = 20  # consecutive; a database down for longer ends the worker


class SurplusTrial(Exception):
    """Another worker already holds the last slot of the study's n_trials."""


@dataclass
class WorkerOptions:
    device: str | None = None
    n_trials: int | None = None  # this worker's own limit
    timeout: float | None = None  # seconds from `started`; no new trial starts after it
    progress: bool = True
    heartbeat_interval: int = HEARTBEAT_INTERVAL
    grace_period: int = GRACE_PERIOD
    poll_interval: float = 2.0
    artifact_dir: str | None = None  # overrides the spec's [artifacts] path
    halve_batch_on_oom: bool = False  # retry an out-of-memory trial at half the batch size
    started: float = dataclasses.field(default_factory=time.monotonic)  # when the command began


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}"


def fingerprint(evaluator: Evaluator) -> tuple[str, dict]:
    """A short id of what makes timings comparable: device, dtype, versions, batch size, threads."""
    unet = denoiser(evaluator.pipe)
    facts = {
        "device": device_name(unet.device),
        "dtype": str(unet.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "batch_size": evaluator.config.batch_size,
        "threads": torch.get_num_threads() if unet.device.type == "cpu" else None,
    }
    digest = hashlib.sha1(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    return digest, facts


def _same_setting(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


class Worker:
    """One process that evaluates trials of one study on one device."""

    def __init__(self, storage_url: str | None, study_name: str, options: WorkerOptions | None = None,
                 evaluator: Evaluator | None = None):
        """`evaluator`: one already loaded for this study's spec (`optsearch run` loads it first)."""
        self.options = options or WorkerOptions()
        self.storage = open_storage(storage_url, self.options.heartbeat_interval,
                                    self.options.grace_period)
        self.study, self.spec = studies.load_study(self.storage, study_name)
        # Load everything that can fail before writing anything to the study.
        self.evaluator = evaluator or evaluator_from_spec(self.spec, self.options.device,
                                                          self.options.progress)
        self.evaluator.fault = oom_fault_from_env()
        self.artifacts = open_artifact_store(self.options.artifact_dir or self.spec.artifacts.path)
        self.fingerprint, self.facts = fingerprint(self.evaluator)
        self.evaluator.calibration = studies.calibration(self.study, self.fingerprint)
        self.evaluator.on_calibrated = lambda name, data: studies.save_calibration(
            self.study, self.fingerprint, name, data)
        self.host = socket.gethostname()
        self.worker_id = f"{self.host}:{os.getpid()}"
        self.baseline: Baseline | None = None
        self.baseline_id: str | None = None  # this worker's current baseline timing
        device = self.evaluator.pipe.device
        self.timing_record = {"worker": self.worker_id, "host": self.host,
                              "device": self.facts["device"], "device_index": str(device),
                              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                              "timings": []}
        self.trials_since_timing = 0
        self.current: optuna.Trial | None = None  # the trial being measured, until it is told
        self.trials_run = 0
        self.database_errors = 0

    # -- baseline -------------------------------------------------------------------------------

    def ensure_baseline(self) -> Baseline:
        """Time this worker's own baseline; reuse the stored images and scores of its fingerprint.

        Images, CLIP scores and features do not depend on the machine, but timings do: every
        worker times the baseline itself (warm-up untimed) and records who timed what.
        """
        stored = self._stored_baseline()
        baseline = self.evaluator.baseline(scored=stored)
        if stored is None:
            artifact = upload_arrays(self.artifacts, self.study, f"baseline-{self.fingerprint}.npz",
                                     images=baseline.images,
                                     image_features=baseline.image_features.cpu().numpy())
            record = {
                "fingerprint": self.fingerprint, **self.facts, "host": self.host,
                "worker": self.worker_id, "seconds_per_image": baseline.seconds_per_image,
                "clip_scores": baseline.clip_scores.tolist(), "clip_mean": baseline.clip_mean,
                "num_samples": len(self.evaluator.prompts), "prompts": self.evaluator.prompts,
                "images_artifact": artifact,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            if self.fingerprint not in studies.baselines(self.study):
                studies.save_baseline(self.study, record)
                self._upload_grid(self.study, f"baseline-{self.fingerprint}.png",
                                  f"baseline {self.facts['device']}: "
                                  f"{baseline.seconds_per_image:.3f} s/image", baseline.images, None)
        self._record_timing(baseline)
        self.baseline = baseline
        return baseline

    def _stored_baseline(self) -> Baseline | None:
        """The stored images and scores of this fingerprint, if the artifact store has them."""
        record = studies.baselines(self.study).get(self.fingerprint)
        if record is None:
            return None
        try:
            arrays = download_arrays(self.artifacts, record["images_artifact"])
        except Exception as error:  # artifact store not shared with this machine
            logger.warning("stored baseline images unavailable (%s): regenerating", error)
            return None
        logger.info("reusing baseline images %s; timing our own", self.fingerprint)
        return Baseline(arrays["images"], math.nan, np.asarray(record["clip_scores"]),
                        torch.from_numpy(arrays["image_features"]))

    def _record_timing(self, baseline: Baseline) -> None:
        """Append this timing to the worker's record in the study: who timed what, where, when."""
        self.timing_record["fingerprint"] = self.fingerprint
        self.timing_record["timings"].append({
            "seconds_per_image": baseline.seconds_per_image,
            "batch_seconds": baseline.batch_seconds,
            "after_trials": self.trials_run,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        self.trials_since_timing = 0
        # which timing a trial's speedup divides by: trials that share one compare their seconds
        # (random: a second Worker in the same process starts its own record)
        self.baseline_id = f"{self.worker_id}/{uuid.uuid4().hex[:12]}"
        studies.save_timing(self.study, self.timing_record)

    def _retime_if_due(self) -> None:
        every = self.spec.search.retime_baseline_every
        if every and self.trials_since_timing >= every:
            logger.info("re-timing the baseline after %d trials", self.trials_since_timing)
            self.baseline = self.evaluator.baseline(scored=self.baseline)
            self._record_timing(self.baseline)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        """Run trials until the study has n_trials finished ones, or this worker's own limit."""
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            baseline = self.ensure_baseline()
            self._print_estimate(baseline)
            self._loop()
        except KeyboardInterrupt:
            self._requeue_interrupted()
            stop_orphaned_heartbeats()
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
        return self.trials_run

    def _print_estimate(self, baseline: Baseline) -> None:
        """What the rest of the study costs at this worker's baseline speed (preflight.py)."""
        from .preflight import Estimate, estimate_text

        finished, _ = self._counts()
        remaining = max(0, self.spec.search.n_trials - finished)
        if remaining:
            estimate = Estimate(baseline.seconds_per_image, remaining, len(self.evaluator.prompts))
            print(f"{self.worker_id}: {remaining} trials to go; {estimate_text(estimate)}",
                  flush=True)

    def _counts(self, ahead_of: int | None = None) -> tuple[int, int]:
        """(finished, running) trials; with `ahead_of`, only running trials numbered below it."""
        trials = self.study.get_trials(deepcopy=False, states=(*studies.FINISHED, TrialState.RUNNING))
        finished = sum(t.state in studies.FINISHED for t in trials)
        running = sum(t.state == TrialState.RUNNING and (ahead_of is None or t.number < ahead_of)
                      for t in trials)
        return finished, running

    def _loop(self) -> None:
        target = self.spec.search.n_trials
        started = self.options.started
        finished, _ = self._counts()
        bar = tqdm(total=target, initial=min(finished, target), desc=f"trials {self.study.study_name}",
                   unit="trial", disable=not self.options.progress)
        try:
            while True:
                if self.options.n_trials is not None and self.trials_run >= self.options.n_trials:
                    break
                if self.options.timeout is not None and time.monotonic() - started > self.options.timeout:
                    break
                try:
                    if not self._step(target, bar):
                        break
                    self.database_errors = 0
                except Exception as error:
                    if not _caused_by_database(error):
                        raise
                    self._recover_from_database_error(error)
        finally:
            bar.close()

    def _step(self, target: int, bar) -> bool:
        """Run one trial, or wait for others' last trials; False when the study is done."""
        optuna.storages.fail_stale_trials(self.study)
        self._fail_orphans()
        finished, running = self._counts()
        bar.n = min(finished, target)
        bar.refresh()
        if finished >= target:
            return False
        if finished + running >= target:  # the last trials belong to other workers
            time.sleep(self.options.poll_interval)
            return True
        self._retime_if_due()
        try:
            self.study.optimize(self._objective, n_trials=1, catch=(SurplusTrial, *OUT_OF_MEMORY),
                                gc_after_trial=False, show_progress_bar=False)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as error:
            # Optuna's "Cannot tell a FAIL trial.": another worker ended ours meanwhile
            if not str(error).startswith(("Cannot tell a", "Trial#")) or not self._failed_by_others():
                raise
        self.current = None  # told to the storage: no longer ours to re-queue
        return True

    def _failed_by_others(self) -> bool:
        """Our trial was failed (and re-queued) by another worker that judged its heartbeat stale:
        its result cannot be told any more; say so and go on with the next trial."""
        if self.current is None:
            return False
        state = self.study._storage.get_trial(self.current._trial_id).state
        if state == TrialState.RUNNING:
            return False
        logger.warning("trial %d was ended (%s) by another worker while this one measured it "
                       "(heartbeat judged stale); going on with the next trial",
                       self.current.number, state.name)
        return True

    def _fail_orphans(self) -> None:
        """Fail and re-queue RUNNING trials whose objective never started.

        Optuna's heartbeat only judges trials that recorded a beat; a trial created just before its
        worker lost the database (or died) may have none, and would stay RUNNING forever.
        """
        now = datetime.datetime.now()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if "worker" in trial.user_attrs or trial.datetime_start is None:
                continue
            if (now - trial.datetime_start).total_seconds() > self.options.grace_period:
                if self._fail_and_requeue(trial._trial_id):
                    logger.warning("trial %d never started measuring: failed and re-queued",
                                   trial.number)

    def _fail_and_requeue(self, trial_id: int) -> bool:
        """Fail a trial that nobody runs any more and queue its parameters again, as the
        heartbeat's stale-trial callback does for dead workers. False if it had already ended."""
        storage = self.study._storage
        if storage.get_trial(trial_id).state == TrialState.RUNNING:
            try:
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker was first
                return False
        failed = storage.get_trial(trial_id)
        if failed.state != TrialState.FAIL:
            return False
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)(self.study, failed)
        return True

    def _recover_from_database_error(self, error: Exception) -> None:
        """The database dropped us: wait, reconnect (pool pre-ping), and fail+re-queue our trial."""
        self.database_errors += 1
        cause = error
        while cause.__context__ is not None and not isinstance(cause, sqlalchemy.exc.SQLAlchemyError):
            cause = cause.__cause__ or cause.__context__
        logger.warning("database error (%s: %s); reconnecting (%d/%d)", type(cause).__name__,
                       str(cause).strip().splitlines()[0] if str(cause).strip() else "",
                       self.database_errors, MAX_DATABASE_ERRORS)
        if self.database_errors >= MAX_DATABASE_ERRORS:
            raise error
        self.storage.reset_session()
        time.sleep(min(10.0, 0.25 * 2 ** self.database_errors))
        if self.current is None:
            return
        try:
            self._fail_and_requeue(self.current._trial_id)  # this process no longer runs it
        except DATABASE_ERRORS:
            pass  # still down: the next step retries; the grace period is the backstop

    # -- one trial ------------------------------------------------------------------------------

    def _objective(self, trial: optuna.Trial):
        self.current = trial
        trial.set_user_attr("worker", self.worker_id)  # first: marks the trial as started
        if self._is_surplus(trial):
            raise SurplusTrial("the study's n_trials are taken by other workers")
        setting = normalize_setting(studies.suggest_setting(trial, self.spec))
        for key, value in {"setting": setting, "combo": combo_name(setting),
                           "fingerprint": self.fingerprint, "device": self.facts["device"],
                           "host": self.host, "batch_size": self.evaluator.config.batch_size}.items():
            trial.set_user_attr(key, value)
        previous = self._previous_result(trial, setting)
        if previous is not None:
            return self._reuse(trial, previous)
        result = self._measure(trial, setting)
        self.trials_run += 1
        self.trials_since_timing += 1
        return self._record(trial, result)

    def _measure(self, trial: optuna.Trial, setting: dict) -> Comparison:
        """Compare the setting with the baseline; on out-of-memory, fail or halve the batch size."""
        halvings = 0
        while True:
            try:
                return self.evaluator.compare(setting, self.baseline, stop_when=self._early_stop(),
                                              keep_images=self.spec.artifacts.grid_prompts)
            except OUT_OF_MEMORY as error:
                _release_memory()
                reason = f"out of memory at batch size {self.evaluator.config.batch_size}: {error}"
                logger.warning("trial %d: %s", trial.number, reason)
                if not self.options.halve_batch_on_oom or self.evaluator.config.batch_size == 1:
                    trial.set_user_attr("fail_reason", reason)
                    raise
                halvings += 1
                self._set_batch_size(self.evaluator.config.batch_size // 2)
                trial.set_user_attr("oom_halvings", halvings)
                trial.set_user_attr("batch_size", self.evaluator.config.batch_size)
                trial.set_user_attr("fingerprint", self.fingerprint)

    def _set_batch_size(self, batch_size: int) -> None:
        """Per-prompt seeds keep images the same; timings need the baseline at this batch size."""
        self.evaluator.config = dataclasses.replace(self.evaluator.config, batch_size=batch_size)
        self.fingerprint, self.facts = fingerprint(self.evaluator)
        self.timing_record = {**self.timing_record, "timings": []}  # a new record: new fingerprint
        self.ensure_baseline()

    def _early_stop(self) -> EarlyStop | None:
        """The early-stop rule for the next trial, against what the study has found so far."""
        spec = self.spec
        if not spec.search.early_stop:
            return None
        rule = EarlyStop(spec.quality.metric, spec.search.min_batches)
        measured = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        rule.first_batches = self._first_batches(measured)
        mode = spec.objective.mode
        if mode == "target-speedup":
            rule.target_speedup = spec.objective.target_speedup
            return rule
        rule.quality_limit = spec.quality.limit
        complete = [t for t in measured if t.state == TrialState.COMPLETE]
        rule.prompt_effects = self._prompt_effects(complete)
        found = [t for t in complete
                 if studies.is_feasible(t) and t.user_attrs.get("fingerprint") == self.fingerprint
                 and t.user_attrs.get("speedup_low") is not None]
        if mode == "max-speedup" and found:
            best = max(found, key=lambda t: t.user_attrs["speedup"]).user_attrs
            rule.speedup_to_beat = SpeedupInterval(best["speedup"], best["speedup_low"],
                                                   best.get("speedup_high"))
            # timed against the same baseline timing: compare seconds, the baseline's noise cancels
            if self.baseline_id is not None and best.get("baseline_id") == self.baseline_id:
                rule.best_batch_seconds = best.get("batch_seconds")
        if mode == "pareto":
            metric = spec.quality.metric
            for trial in found:
                interval = Interval(**studies.metric_interval(trial.user_attrs, metric))
                safe = unsafe_side(interval, metric, "bound")
                if safe is not None:
                    rule.front.append(FrontPoint(trial.user_attrs["speedup_low"], safe))
        return rule

    def _first_batches(self, trials: list) -> FirstBatches:
        """How first batches read on this device fingerprint: from the study's trials measured
        here (finished or stopped early, not reused), after a warm-up and without one."""
        return FirstBatches.of(
            (t.user_attrs["batch_seconds"], (t.user_attrs.get("warmup_seconds") or 0) > 0)
            for t in trials
            if t.user_attrs.get("fingerprint") == self.fingerprint and "reused_from" not in t.user_attrs
            and t.user_attrs.get("batch_seconds"))

    def _prompt_effects(self, complete: list) -> PromptEffects | None:
        """The prompts' effects on the study's metric, from complete trials measured (not reused)
        on all its prompts."""
        key = per_prompt_key(self.spec.quality.metric)
        rows = [t.user_attrs[key] for t in complete
                if len(t.user_attrs.get(key) or ()) == self.spec.prompts.num_samples
                and "reused_from" not in t.user_attrs]
        return PromptEffects.of(rows)

    def _is_surplus(self, trial: optuna.Trial) -> bool:
        """True when finished trials plus earlier running ones already fill n_trials."""
        finished, ahead = self._counts(ahead_of=trial.number)
        if finished + ahead < self.spec.search.n_trials:
            return False
        fixed = self.study._storage.get_trial_system_attrs(trial._trial_id).get("fixed_params")
        if fixed:  # a re-queued trial must not be lost: queue it again
            self.study.enqueue_trial(fixed, skip_if_exists=False)
        return True

    def _previous_result(self, trial: optuna.Trial, setting: dict):
        """A finished trial of the same setting on this fingerprint (waiting for a running one)."""
        while True:
            running_twin = False
            for other in self.study.get_trials(deepcopy=False,
                                               states=(*studies.FINISHED, TrialState.RUNNING)):
                if other.number == trial.number or other.user_attrs.get("fingerprint") != self.fingerprint:
                    continue
                if not _same_setting(other.user_attrs.get("setting", {}), setting):
                    continue
                if other.state in studies.FINISHED and "constraints" in other.user_attrs:
                    return other
                if other.state == TrialState.RUNNING and other.number < trial.number:
                    running_twin = True
            if not running_twin:
                return None
            time.sleep(self.options.poll_interval)
            optuna.storages.fail_stale_trials(self.study)

    def _reuse(self, trial: optuna.Trial, previous):
        """Copy a finished trial's result (Optuna's FAQ pattern) instead of measuring again."""
        for key, value in previous.user_attrs.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("reused_from", previous.number)
        self._set_constraints(trial, previous.user_attrs["constraints"])
        self.trials_run += 1
        logger.info("trial %d reuses trial %d (same setting, same device)", trial.number,
                    previous.number)
        if previous.state == TrialState.PRUNED:
            raise optuna.TrialPruned(f"same setting as trial {previous.number}, which was pruned")
        return previous.values if len(previous.values) > 1 else previous.values[0]

    def _set_constraints(self, trial: optuna.Trial, values: dict[str, float]) -> None:
        for name, value in values.items():
            trial.set_constraint(name, value)
        trial.set_user_attr("constraints", values)
        # optuna-dashboard 0.21 reads only the older list form.
        self.study._storage.set_trial_system_attr(trial._trial_id, studies.DASHBOARD_CONSTRAINTS_KEY,
                                                  list(values.values()))

    def _record(self, trial: optuna.Trial, result: Comparison):
        summary = result.summary()
        attrs = {
            "speedup": summary["speedup"],
            "speedup_low": summary["speedup_low"],
            "speedup_high": summary["speedup_high"],
            "seconds_per_image": summary["seconds_per_image"],
            "baseline_seconds_per_image": summary["baseline_seconds_per_image"],
            "clip_mean": summary["clip_mean"],
            "clip_loss": summary["clip_loss"]["mean"],
            "clip_loss_low": studies.finite(summary["clip_loss"]["low"]),
            "clip_loss_high": studies.finite(summary["clip_loss"]["high"]),
            "psnr": summary["psnr"]["mean"],
            "psnr_low": studies.finite(summary["psnr"]["low"]),
            "psnr_high": studies.finite(summary["psnr"]["high"]),
            "ssim": summary["ssim"]["mean"],
            "ssim_low": studies.finite(summary["ssim"]["low"]),
            "ssim_high": studies.finite(summary["ssim"]["high"]),
            "clip_image_cosine": summary["clip_image_cosine"],
            "batches_evaluated": result.batches_evaluated,
            "n_batches": result.n_batches,
            "early_stopped": result.early_stopped,
            "early_stop_reason": result.early_stop_reason,
            "inference_seconds": result.inference_seconds,
            "batch_seconds": [float(v) for v in result.batch_seconds],  # per image, per batch
            "baseline_id": self.baseline_id,
            "warmup_seconds": result.warmup_seconds,
            "scoring_seconds": result.scoring_seconds,
            "wall_seconds": result.wall_seconds,
            "image_digests": result.image_digests,
            # the study's metric per prompt: early stop learns the prompts' own effects from it
            per_prompt_key(self.spec.quality.metric): [
                float(v) for v in result.per_prompt(self.spec.quality.metric)],
        }
        if result.early_stopped:
            per_batch = result.wall_seconds / result.batches_evaluated
            attrs["early_stop_saved_s"] = per_batch * (result.n_batches - result.batches_evaluated)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        self._set_constraints(trial, studies.constraints(self.spec, summary))
        metric = self.spec.quality.metric
        quality = result.interval(metric)
        self._upload_grid(trial, f"trial-{trial.number:04d}_{result.combo}_speedup-{result.speedup:.2f}"
                                 f"_{metric}-{quality.mean:.3f}.png",
                          f"trial {trial.number} {result.combo}: speedup {result.speedup_interval}, "
                          f"{metric} {format_interval(quality.to_dict())}",
                          self.baseline.images, result.images)
        write_trial_note(self.study, trial._trial_id,
                         trial_note(trial.number, {**attrs, "combo": result.combo,
                                                   "constraints": trial.user_attrs.get("constraints")},
                                    self.spec))
        values = studies.objective_values(self.spec, summary)
        if result.early_stopped:
            if len(values) == 1:  # what was measured, for the sampler (TPE ranks pruned trials by it)
                trial.report(values[0], result.batches_evaluated)
            raise optuna.TrialPruned(f"early stop ({result.early_stop_reason}) after "
                                     f"{result.batches_evaluated} of {result.n_batches} batches")
        return values if len(values) > 1 else values[0]

    def _upload_grid(self, target, name: str, title: str, baseline_images, trial_images) -> None:
        """An image grid artifact: baseline (and trial) images of the first prompts."""
        count = self.spec.artifacts.grid_prompts
        if count == 0:
            return
        shown = min(count, len(baseline_images) if trial_images is None else len(trial_images))
        rows = [(self.evaluator.prompts[i], baseline_images[i],
                 None if trial_images is None else trial_images[i]) for i in range(shown)]
        upload_bytes(self.artifacts, target, name, image_grid(rows, title), "image/png")

    def _requeue_interrupted(self) -> None:
        """Re-queue the trial an interrupt failed (Optuna marks it FAIL), with the same parameters."""
        if self.current is not None:
            self._fail_and_requeue(self.current._trial_id)


def _caused_by_database(error: BaseException | None) -> bool:
    """A database error, or an error raised while one was being handled (Optuna's own clean-up
    after a failed `tell` can end in an AssertionError whose context is the database error)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DATABASE_ERRORS):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def per_prompt_key(metric: str) -> str:
    """The user attr holding a trial's `metric` per prompt (written by _record, read by early stop)."""
    return f"{metric}_per_prompt"


def stop_orphaned_heartbeats() -> None:
    """Stop Optuna heartbeat threads an interrupt left running. A Ctrl-C while Optuna starts one
    (Thread.start waits for the new thread) skips its `with` block's exit, and Python's shutdown
    then waits for that non-daemon thread forever (seen: a --devices child hung after printing
    'interrupted', on a slow machine)."""
    from optuna.storages._heartbeat import HeartbeatThread

    for thread in threading.enumerate():
        if getattr(thread, "_target", None) is HeartbeatThread._record_heartbeat:
            thread._args[2].set()  # its stop event


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
