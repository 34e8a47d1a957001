"""Confirmation: a study's best settings re-measured on prompts the search never used.

The search winner is the best of many noisy trials, judged on the very prompts that selected it:
its speedup is biased up and its quality loss down (the winner's curse). `confirm` re-measures the
top settings on unseen prompts (by default the next `num_samples` of the search's source), from
latent noise of their own (`[confirm] seed`, by default the search's seed + 1: new prompts and new
noise) against a fresh baseline. Timing runs in `repeats` rounds (3 by default), each an A B B A
block (baseline, setting, setting, baseline) so that a drift within the round cancels; the
speedup's interval is over the rounds' paired log ratios (measure/speedup.py `rounds_interval`),
so what a whole pass shares is in it. Each setting's result is stored in the study as soon as it
is measured, so a killed `confirm` loses nothing stored and a second one adds to what is there.
"""

from __future__ import annotations

import logging
import os
import socket

from optuna.trial import FrozenTrial
from tqdm.auto import tqdm

from optsearch.measure.evaluate import Baseline, Evaluator, evaluator_from_spec
from optsearch.measure.fingerprint import fingerprint, pipeline_signature
from optsearch.measure.generation import GenerationConfig
from optsearch.measure.speedup import rounds_interval
from optsearch.optimize import objectives
from optsearch.optimize import study as studies
from optsearch.optimize.baseline import check_same_pipeline
from optsearch.optimize.confirm_targets import (
    ConfirmOptions,
    ConfirmTargets,
    confirm_seed,
    confirmation_key,
)
from optsearch.storage.notes import confirmed_line
from optsearch.storage.record import feasible, finite, utc_now

logger = logging.getLogger(__name__)


class Confirmation:
    """Re-measures a study's best settings on unseen prompts, storing each result as it ends."""

    def __init__(self, storage_url: str | None, study_name: str, options: ConfirmOptions | None = None,
                 evaluator: Evaluator | None = None, targets: ConfirmTargets | None = None):
        """`targets`: what `ConfirmTargets.load` read already (the CLI reads it before torch loads)."""
        self.options = options or ConfirmOptions()
        targets = targets or ConfirmTargets.load(storage_url, study_name, self.options)
        self.targets = targets
        self.storage, self.study, self.spec = targets.storage, targets.study, targets.spec
        self.candidates, self.prompts = targets.candidates, targets.prompts
        seed = confirm_seed(self.spec)
        loaded = evaluator or evaluator_from_spec(self.spec, self.options.device,
                                                  self.options.progress, prompts=self.prompts)
        config = GenerationConfig.from_spec(self.spec, seed=seed)
        self.fingerprint, self.facts = fingerprint(loaded.pipe, config.batch_size)
        check_same_pipeline(self.study, pipeline_signature(loaded.pipe), self.facts["dtype"])
        # the calibration the search measured (MagCache's ratios): the same setting is confirmed
        self.evaluator = loaded.derive(prompts=self.prompts, config=config, calibration={
            **loaded.calibration, **studies.calibration(self.study, self.fingerprint)})
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.reference: Baseline | None = None

    def key(self, trial: FrozenTrial) -> str:
        return confirmation_key(trial.user_attrs["setting"], self.fingerprint, self.prompts,
                                self.evaluator.config.seed)

    def run(self) -> list[dict]:
        """Confirm every candidate not confirmed yet; returns all this study's records of them."""
        stored = studies.confirmations(self.study)
        for trial in self.candidates:
            if self.key(trial) in stored:
                logger.info("trial %d already confirmed", trial.number)
                continue
            record = self.measure(trial)
            studies.save_confirmation(self.study, record)
            if self.options.lines:
                tqdm.write(f"{self.worker_id}: {confirmed_line(record, self.spec)}")
        stored = studies.confirmations(self.study)
        records = [stored[self.key(trial)] for trial in self.candidates]
        self.targets.finish(records)
        return records

    def measure(self, trial: FrozenTrial) -> dict:
        """Time baseline and setting in `repeats` A B B A rounds; score the setting once."""
        setting = trial.user_attrs["setting"]
        if self.reference is None:  # images and CLIP scores of the unseen prompts, once
            self.reference = self.evaluator.baseline()
        base_rounds, fast_rounds, ratios = [], [], []
        comparison = None
        for _ in range(self.options.repeats):
            first = self.evaluator.baseline(scored=self.reference)
            if comparison is None:  # the first setting pass is also the one scored
                comparison = self.evaluator.compare(setting, first)
                fast = [comparison.seconds_per_image]
            else:
                fast = [self.evaluator.time_setting(setting)[0]]
            fast.append(self.evaluator.time_setting(setting)[0])
            base = [first.seconds_per_image,
                    self.evaluator.baseline(scored=self.reference).seconds_per_image]
            base_rounds.append(sum(base) / 2)
            fast_rounds.append(sum(fast) / 2)
            ratios.append(base_rounds[-1] / fast_rounds[-1])
        interval = rounds_interval(ratios, self.spec.quality.confidence)
        summary = comparison.summary()
        figures = {**summary, **interval.to_dict(),
                   "seconds_per_image": sum(fast_rounds) / len(fast_rounds),
                   "baseline_seconds_per_image": sum(base_rounds) / len(base_rounds)}
        constraints = objectives.constraints(self.spec, figures)
        return {
            "key": self.key(trial), "trial": trial.number, "combo": comparison.combo,
            "setting": setting, "prompts": self.prompts, "num_samples": len(self.prompts),
            "seed": self.evaluator.config.seed, "repeats": self.options.repeats,
            "round_speedups": ratios, "timing": "ABBA rounds",
            **interval.to_dict(),
            "seconds_per_image": figures["seconds_per_image"],
            "baseline_seconds_per_image": figures["baseline_seconds_per_image"],
            "clip_mean": summary["clip_mean"], "baseline_clip_mean": summary["baseline_clip_mean"],
            **{metric: {k: finite(v) for k, v in summary[metric].to_dict().items()}
               for metric in comparison.metrics()},
            **{f"{metric}_{statistic}": summary[f"{metric}_{statistic}"]
               for metric in comparison.metrics() for statistic in ("worst", "p10")},
            "constraints": constraints, "feasible": feasible({"constraints": constraints}),
            "rule": self.spec.quality.rule, "image_digests": comparison.image_digests,
            "fingerprint": self.fingerprint, "device": self.facts["device"], "facts": self.facts,
            "worker": self.worker_id, "date": utc_now(),
        }
