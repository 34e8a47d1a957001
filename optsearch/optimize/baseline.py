"""A worker's baseline: the plain pipeline's images, scores and its own timing.

Images, CLIP scores and features do not depend on the machine, so the first worker of a device
fingerprint stores them and later workers reuse them. Timings do depend on the machine: every
worker times the baseline itself (after an untimed warm-up), re-times it every
`search.retime_baseline_every` trials, and records who timed what in the study. Between trials it
times one batch of the plain pipeline now and then (a probe, `search.probe_every`): how much a
whole pass's speed varies on the device (optimize/pass_noise.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid

import numpy as np
import optuna
import torch

from optsearch.accelerators import attention_of, scheduler_of
from optsearch.deployment import output_size
from optsearch.errors import UsageError, error_text
from optsearch.measure.evaluate import Baseline, Evaluator
from optsearch.measure.fingerprint import fingerprint, pipeline_signature
from optsearch.measure.metrics import PSNR_CAP
from optsearch.measure.prompts import prompts_digest
from optsearch.measure.speedup import PassNoise
from optsearch.optimize import pass_noise
from optsearch.optimize import study as studies
from optsearch.optimize.recovery import OUT_OF_MEMORY, release_memory
from optsearch.storage.artifacts import download_arrays, upload_arrays, upload_grid
from optsearch.storage.record import utc_now
from optsearch.study_spec import StudySpec

logger = logging.getLogger(__name__)
ABOVE_LIMIT = ("only a setting that uses less memory than the plain pipeline can be feasible (most "
               "caches keep more; ToMe can use less)")


def check_same_pipeline(study: optuna.Study, signature: str, dtype: str) -> None:
    """Refuse a pipeline other than the one the study measured (a notebook's pipeline with
    another LoRA fused, an edited factory, a new model revision under the same id): its trials
    would be scored against the stored baseline images of another pipeline, or a finished study
    would hand back another pipeline's answer. Baselines stored before signatures are not
    compared, nor those of another dtype (their bits differ)."""
    for record in studies.baselines(study).values():
        if record.get("pipeline") in (None, signature) or record.get("dtype") != dtype:
            continue
        raise UsageError(f"this pipeline is not the one study {study.study_name!r} measured: its "
                         f"weights or scheduler differ from those of the baseline {record['worker']} "
                         f"stored on {record['device']} (another LoRA, fine-tune, model revision or "
                         "scheduler?); search it as a new study (--name, or name= in optsearch.search)")


def check_same_prompts(study: optuna.Study, digest: str) -> None:
    """Refuse prompts other than those the study's baselines were made from (a prompt file edited
    since, another copy of an image folder on this machine): this worker's trials would be scored
    against the stored images of other prompts. Baselines stored before digests are not compared."""
    for record in studies.baselines(study).values():
        if record.get("inputs") in (None, digest):
            continue
        raise UsageError(f"this worker's prompts are not the ones study {study.study_name!r} "
                         f"measured: their texts or images differ from those of the baseline "
                         f"{record['worker']} stored on {record['device']} (a prompt file or folder "
                         "edited since, or another copy of it here); give every worker the same "
                         "prompts, or search them as a new study")


class BaselineKeeper:
    """The baseline one worker measures trials against, and its record in the study."""

    def __init__(self, study: optuna.Study, spec: StudySpec, evaluator: Evaluator, artifacts,
                 worker_id: str, host: str, device_index: str, cuda_visible_devices: str | None):
        self.study = study
        self.spec = spec
        self.evaluator = evaluator
        self.artifacts = artifacts
        self.worker_id = worker_id
        self.host = host
        self.fingerprint, self.facts = fingerprint(evaluator.pipe, evaluator.config.batch_size)
        self.signature = pipeline_signature(evaluator.pipe)
        check_same_pipeline(study, self.signature, self.facts["dtype"])
        self.inputs = prompts_digest(evaluator.prompts)
        check_same_prompts(study, self.inputs)
        self.timing_record = {"worker": worker_id, "host": host, "device": self.facts["device"],
                              "device_index": device_index,
                              "cuda_visible_devices": cuda_visible_devices, "timings": [],
                              "probes": []}
        self.baseline: Baseline | None = None
        self.baseline_id: str | None = None  # which timing trials divide by; trials sharing one
        self.trials_since_timing = 0  # compare their own seconds (random: two Workers of one
        # process must not share it)
        self.trials_since_probe = 0

    def trial_measured(self) -> None:
        """Count a trial this worker measured (not one it reused) toward re-timing and probing."""
        self.trials_since_timing += 1
        self.trials_since_probe += 1

    def pass_noise(self) -> PassNoise:
        """The device's pass-level timing noise, from every worker's probes and baseline passes of
        this fingerprint."""
        return pass_noise.estimate(studies.timings(self.study), self.fingerprint,
                                   self.spec.search.pass_noise)

    def probe_if_due(self, trials_run: int) -> None:
        """Time one baseline batch when the pass noise needs another probe, and record it."""
        if not pass_noise.probe_due(self.trials_since_probe, self.spec.search.probe_every):
            return
        self.timing_record["probes"].append({"seconds_per_image": self.evaluator.probe(),
                                             "after_trials": trials_run, "at": utc_now()})
        self.trials_since_probe = 0
        studies.save_timing(self.study, self.timing_record)

    def ensure(self, trials_run: int) -> Baseline:
        """Time this worker's own baseline; reuse the stored images and scores of its fingerprint."""
        stored = self._stored()
        baseline = self.evaluator.baseline(scored=stored)
        if stored is None:
            self._store(baseline)
        limit = self.spec.objective.max_memory_gib
        if limit is not None and (baseline.peak_memory_gib or 0.0) > limit:
            logger.warning("the plain pipeline peaks at %.2f GiB here, above "
                           "objective.max_memory_gib = %g: %s", baseline.peak_memory_gib, limit,
                           ABOVE_LIMIT)
        self._record_timing(baseline, trials_run)
        self.baseline = baseline
        return baseline

    def between_trials(self, trials_run: int, halve: bool = False) -> None:
        """Re-time the baseline, or probe it, when either is due. Out of memory there (what the
        trials left behind) goes on at half the batch size as the first baseline does, with
        `halve`; else it ends the worker (one line, exit 2)."""
        try:
            self.retime_if_due(trials_run)
            self.probe_if_due(trials_run)
        except OUT_OF_MEMORY:
            if not self._halved_after_oom(halve, "the baseline ran out of memory between trials"):
                raise
            self.ensure_fitting(trials_run, halve)

    def retime_if_due(self, trials_run: int) -> None:
        every = self.spec.search.retime_baseline_every
        if every and self.trials_since_timing >= every:
            logger.info("re-timing the baseline after %d trials", self.trials_since_timing)
            self.retime(trials_run)

    def retime(self, trials_run: int) -> None:
        """Time the baseline again (its images and scores stay) and record the timing."""
        self.baseline = self.evaluator.baseline(scored=self.baseline)
        self._record_timing(self.baseline, trials_run)

    def ensure_fitting(self, trials_run: int, halve: bool) -> Baseline:
        """`ensure`, where the plain pipeline may not fit the device at the spec's batch size:
        with `halve` (--halve-batch-on-oom) at half the size until it fits, else one line (exit
        2) that says which size ran out and what to change, not the allocator's traceback."""
        while True:
            try:
                return self.ensure(trials_run)
            except OUT_OF_MEMORY as error:
                size = self.evaluator.config.batch_size
                if not self._halved_after_oom(halve, "the plain pipeline ran out of memory"):
                    fix = ("it does not fit this device: offload it (a factory, as "
                           "studies/offload_pipes.py) or take a smaller model.dtype" if size == 1
                           else "lower prompts.batch_size"
                           + ("" if halve else " (or start workers with --halve-batch-on-oom)"))
                    raise UsageError(f"the plain pipeline ran out of memory at batch size {size} on "
                                     f"{self.facts['device']}: {fix} ({error_text(error)})") from None

    def _halved_after_oom(self, halve: bool, what: str) -> bool:
        """After the baseline ran out of memory: memory released and, with `halve`, the keeper
        started over at half the batch size (its baseline still to time); False where it cannot
        (not asked, or one image already)."""
        release_memory()
        size = self.evaluator.config.batch_size
        if not halve or size == 1:
            return False
        logger.warning("%s at batch size %d: going on at %d", what, size, size // 2)
        self._start_over(self._halved())
        return True

    def halve_batch(self, trials_run: int) -> int:
        """Go on at half the batch size (after a trial ran out of memory); returns the new size.
        Per-prompt seeds keep the images; timings need a baseline at this batch size."""
        self._start_over(self._halved())
        self.ensure(trials_run)
        return self.evaluator.config.batch_size

    def _halved(self) -> Evaluator:
        config = self.evaluator.config
        return self.evaluator.derive(config=dataclasses.replace(config, batch_size=config.batch_size // 2))

    def _start_over(self, evaluator: Evaluator) -> None:
        """Go on with another evaluator of the same pipeline (a smaller batch size after an
        out-of-memory): a new fingerprint and a new timing record; its baseline still to time."""
        self.evaluator = evaluator
        self.fingerprint, self.facts = fingerprint(evaluator.pipe, evaluator.config.batch_size)
        self.timing_record = {**self.timing_record, "timings": [], "probes": []}

    def _stored(self) -> Baseline | None:
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

    def _store(self, baseline: Baseline) -> None:
        """The first worker of a fingerprint stores its images, scores and a grid."""
        artifact = upload_arrays(self.artifacts, self.study, f"baseline-{self.fingerprint}.npz",
                                 images=baseline.images,
                                 image_features=baseline.image_features.cpu().numpy())
        record = {
            "fingerprint": self.fingerprint, **self.facts, "host": self.host,
            # "native" too (the fingerprint names only another); None: the denoiser does not
            # dispatch through diffusers' attention backends (UNets, SD3)
            "attention": attention_of(self.evaluator.pipe),
            "scheduler": scheduler_of(self.evaluator.pipe),  # the deployment context's
            "pipeline": self.signature,  # which weights: a changed pipeline cannot join
            "inputs": self.inputs,  # which prompts (texts, images): changed ones cannot join
            **output_size(baseline.images),  # the size (and frames) it made: the context's
            # the true CFG its calls ran, where the pipeline has one (the context's, too)
            "true_cfg_scale": self.evaluator.config.true_cfg_ran(self.evaluator.pipe),
            "worker": self.worker_id, "seconds_per_image": baseline.seconds_per_image,
            "clip_scores": baseline.clip_scores.tolist(), "clip_mean": baseline.clip_mean,
            "num_samples": len(self.evaluator.prompts), "prompts": self.evaluator.prompts,
            "images_artifact": artifact, "created": utc_now(),
        }
        if self.fingerprint in studies.baselines(self.study):
            return  # another worker stored it meanwhile
        studies.save_baseline(self.study, record)
        upload_grid(self.artifacts, self.study, f"baseline-{self.fingerprint}.png",
                    f"baseline {self.facts['device']}: {baseline.seconds_per_image:.3f} s/image",
                    self.evaluator.prompts, self.spec.artifacts.grid_prompts, baseline.images,
                    fps=self.spec.model.fps)

    def _record_timing(self, baseline: Baseline, trials_run: int) -> None:
        """Append this timing to the worker's record in the study: who timed what, where, when."""
        self.timing_record["fingerprint"] = self.fingerprint
        self.timing_record["timings"].append({
            "seconds_per_image": baseline.seconds_per_image,
            "batch_seconds": baseline.batch_seconds,
            "warmup_seconds": baseline.warmup_seconds,  # untimed (compiled: the compile)
            "after_trials": trials_run,
            "at": utc_now(),
            "images_agree_psnr": baseline.agreement_psnr,  # its images against the stored ones
        })
        if baseline.agreement_psnr is not None and baseline.agreement_psnr < PSNR_CAP:
            logger.warning("this worker's baseline pass made other images than the ones its trials "
                           "are scored against (stored for its device; worst prompt %.1f dB, %g: "
                           "identical): their quality figures carry that difference (a GPU's "
                           "nondeterminism, or other library builds)", baseline.agreement_psnr,
                           PSNR_CAP)
        self.trials_since_timing = 0
        self.baseline_id = f"{self.worker_id}/{uuid.uuid4().hex[:12]}"
        studies.save_timing(self.study, self.timing_record)
