"""Measuring a setting against the baseline: images, timing and quality, prompt by prompt.

An `Evaluator` holds what one process loaded once (pipeline, CLIP model, prompts) and measures
any number of settings with it; a `Comparison` is one setting's measurement, batch by batch.
CLIP scoring is timed apart from generation.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from optsearch.accelerators import (
    AppliedSetting,
    combo_name,
    combo_problem,
    denoiser,
    magcache,
    normalize_setting,
    pipeline_kind,
    pipeline_problem,
)
from optsearch.errors import ModelLoadError
from optsearch.measure.generation import Batch, GenerationConfig, generate, n_batches, prompt_seed
from optsearch.measure.metrics import METRICS, Interval
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import prompts_of
from optsearch.measure.quality import ClipScorer, psnr, ssim_batch
from optsearch.measure.speedup import SpeedupInterval, speedup_interval

logger = logging.getLogger(__name__)


@dataclass
class Baseline:
    """The plain pipeline's images, timing and CLIP scores: what every setting is compared with.

    `batch_seconds` holds each timed batch's seconds per image, for the speedup interval.
    """

    images: np.ndarray
    seconds_per_image: float
    clip_scores: np.ndarray
    image_features: torch.Tensor
    batch_seconds: list[float] = field(default_factory=list)

    @property
    def compute_fraction(self) -> float | None:
        """The share of a full run's denoiser computation the setting ran (steps x blocks), as
        its families report it; None when one of them reports nothing."""
        return float(np.mean(self.compute_fractions)) if self.compute_fractions else None

    @property
    def clip_mean(self) -> float:
        return float(self.clip_scores.mean())


@dataclass
class Comparison:
    """A setting measured against the baseline, prompt by prompt."""

    setting: dict
    num_samples: int
    batch_size: int
    n_batches: int
    confidence: float
    baseline_seconds_per_image: float
    baseline_batch_seconds: list[float] = field(default_factory=list)
    batch_seconds: list[float] = field(default_factory=list)  # seconds per image of each batch
    batches_evaluated: int = 0
    inference_seconds: float = 0.0
    warmup_seconds: float = 0.0
    scoring_seconds: float = 0.0
    wall_seconds: float = 0.0
    early_stopped: bool = False
    early_stop_reason: str | None = None  # quality, speedup or dominated (see early_stop.py)
    clip_scores: list[float] = field(default_factory=list)
    baseline_clip_scores: list[float] = field(default_factory=list)
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    clip_image_cosine: list[float] = field(default_factory=list)
    image_digests: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    compute_fractions: list[float] = field(default_factory=list)  # per batch, where reported

    @property
    def combo(self) -> str:
        return combo_name(self.setting)

    @property
    def images_evaluated(self) -> int:
        return len(self.clip_scores)

    @property
    def seconds_per_image(self) -> float:
        return self.inference_seconds / max(1, self.images_evaluated)

    @property
    def speedup(self) -> float:
        return self.baseline_seconds_per_image / self.seconds_per_image

    @property
    def speedup_interval(self) -> SpeedupInterval:
        return self.speedup_interval_at(self.confidence)

    def speedup_interval_at(self, confidence: float, pooled: bool = False) -> SpeedupInterval:
        return speedup_interval(self.baseline_batch_seconds, self.batch_seconds, confidence,
                                self.speedup, pooled)

    @property
    def compute_fraction(self) -> float | None:
        """The share of a full run's denoiser computation the setting ran (steps x blocks), as
        its families report it; None when one of them reports nothing."""
        return float(np.mean(self.compute_fractions)) if self.compute_fractions else None

    @property
    def clip_mean(self) -> float:
        return float(np.mean(self.clip_scores))

    @property
    def clip_image_cosine_mean(self) -> float:
        return float(np.mean(self.clip_image_cosine))

    @property
    def clip_loss_per_prompt(self) -> np.ndarray:
        return np.asarray(self.baseline_clip_scores) - np.asarray(self.clip_scores)

    def per_prompt(self, metric: str) -> list[float] | np.ndarray:
        """The per-prompt values of `clip_loss`, `psnr` or `ssim` measured so far."""
        return self.clip_loss_per_prompt if metric == "clip_loss" else getattr(self, metric)

    def interval(self, metric: str, confidence: float | None = None) -> Interval:
        """The mean and confidence interval of a metric over the prompts measured so far."""
        return Interval.of(self.per_prompt(metric), confidence or self.confidence)

    def summary(self) -> dict:
        """The figures a user reads and a trial records (each metric an `Interval`); per-prompt
        values, and plain dicts for JSON, are in `to_dict`."""
        return {
            "combo": self.combo,
            "setting": self.setting,
            **self.speedup_interval.to_dict(),
            "seconds_per_image": self.seconds_per_image,
            "baseline_seconds_per_image": self.baseline_seconds_per_image,
            "clip_mean": self.clip_mean,
            "baseline_clip_mean": float(np.mean(self.baseline_clip_scores)),
            **{metric: self.interval(metric) for metric in METRICS},
            "clip_image_cosine": float(np.mean(self.clip_image_cosine)),
            "compute_fraction": self.compute_fraction,
            "batches_evaluated": self.batches_evaluated,
            "n_batches": self.n_batches,
            "batch_size": self.batch_size,
            "early_stopped": self.early_stopped,
            "early_stop_reason": self.early_stop_reason,
            "confidence": self.confidence,
            "inference_seconds": self.inference_seconds,
            "warmup_seconds": self.warmup_seconds,
            "scoring_seconds": self.scoring_seconds,
            "wall_seconds": self.wall_seconds,
        }

    def to_dict(self) -> dict:
        per_prompt = {
            "clip_scores": self.clip_scores,
            "baseline_clip_scores": self.baseline_clip_scores,
            "clip_loss": self.clip_loss_per_prompt.tolist(),
            "psnr": self.psnr,
            "ssim": self.ssim,
            "clip_image_cosine": self.clip_image_cosine,
            "image_digests": self.image_digests,
        }
        timing = {"batch_seconds": self.batch_seconds,
                  "baseline_batch_seconds": self.baseline_batch_seconds}
        summary = {key: value.to_dict() if isinstance(value, Interval) else value
                   for key, value in self.summary().items()}
        return {**summary, "per_prompt": per_prompt, "per_batch": timing}


def image_digest(image: np.ndarray) -> str:
    """A short hash of an 8-bit image: lets anyone check a reproduction is bit-exact."""
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


class Evaluator:
    """Everything needed to measure settings in one process: pipeline, CLIP model and prompts.

    The pipeline and CLIP model are loaded once and reused for every setting.
    """

    def __init__(self, pipe, scorer: ClipScorer, prompts: list[str], config: GenerationConfig,
                 confidence: float = 0.95, progress: bool = False, warmup: bool | int = True,
                 calibration: dict[str, dict] | None = None,
                 on_calibrated: Callable[[str, dict], None] | None = None,
                 fault: Callable[[str, int], None] | None = None, warm: set | None = None):
        """`warmup`: the short untimed warm-up (True), none (False), or that many steps.
        `calibration`: per-model data a family needs (MagCache's ratios), measured once when first
        needed; `on_calibrated(name, data)` hears of each new measurement (the worker stores it).
        `fault(combo, batch index)`: called in each timed batch (the fault-injection tests)."""
        self.pipe = pipe
        self.scorer = scorer
        self.prompts = prompts
        self.config = config
        self.confidence = confidence
        self.progress = progress
        self.warmup = warmup
        self.calibration = dict(calibration or {})
        self.on_calibrated = on_calibrated
        self.fault = fault
        # (combo, batch size) pairs this process has already run: nothing of theirs is cold any
        # more (kernels, allocations, patched code paths), so the short warm-up is skipped.
        self.warm: set[tuple[str, int]] = set() if warm is None else warm

    def derive(self, **changes) -> Evaluator:
        """A new evaluator on the same loaded pipeline and CLIP model (and the same record of what
        is warm), with other prompts, config, calibration, callbacks or warm-up."""
        current = {"prompts": self.prompts, "config": self.config, "confidence": self.confidence,
                   "progress": self.progress, "warmup": self.warmup, "calibration": self.calibration,
                   "on_calibrated": self.on_calibrated, "fault": self.fault}
        return Evaluator(self.pipe, self.scorer, warm=self.warm, **{**current, **changes})

    @property
    def n_batches(self) -> int:
        return n_batches(len(self.prompts), self.config.batch_size)

    def _warmup_for(self, combo: str) -> bool | int:
        """The warm-up a run of `combo` needs: none when this process already ran it at this batch
        size (measured: timings then match those after a warm-up, benchmarks/RESULTS.md "Warm-up")."""
        if self.warmup is True and (combo, self.config.batch_size) in self.warm:
            return False
        return self.warmup

    def _generate(self, combo: str, setting: AppliedSetting | None = None, **kwargs) -> Iterator[Batch]:
        """`generate` with the warm-up this combo needs; marks the combo warm once a batch ran."""
        fault = self.fault and (lambda index: self.fault(combo, index))
        for batch in generate(self.pipe, self.prompts, self.config, setting=setting,
                              progress=self.progress, description=combo, fault=fault,
                              warmup=self._warmup_for(combo), **kwargs):
            self.warm.add((combo, self.config.batch_size))
            yield batch

    def baseline(self, scored: Baseline | None = None) -> Baseline:
        """Generate, time and score the plain pipeline.

        With `scored` (a stored baseline of the same prompts and seeds: images do not depend on the
        machine) only the timing is this call's own; its images, scores and features are kept.
        """
        images, seconds, batch_seconds, scores, features = [], 0.0, [], [], []
        for batch in self._generate("baseline"):
            images.append(batch.images)
            seconds += batch.seconds
            batch_seconds.append(batch.seconds_per_image)
            if scored is None:
                batch_scores, batch_features = self.scorer.score(
                    batch.images, [self.prompts[i] for i in batch.indices])
                scores.append(batch_scores)
                features.append(batch_features)
        seconds_per_image = seconds / len(self.prompts)
        if scored is not None:
            return Baseline(scored.images, seconds_per_image, scored.clip_scores,
                            scored.image_features, batch_seconds)
        return Baseline(np.concatenate(images), seconds_per_image, np.concatenate(scores),
                        torch.cat(features), batch_seconds)

    def apply(self, setting: Mapping) -> AppliedSetting:
        """Apply `setting` to the pipeline, calibrating first what it needs and is not known."""
        if "magcache" in normalize_setting(setting) and "magcache" not in self.calibration:
            self.calibration["magcache"] = {"mag_ratios": self._calibrate_magcache()}
            if self.on_calibrated is not None:
                self.on_calibrated("magcache", self.calibration["magcache"])
        return AppliedSetting(self.pipe, setting, self.calibration)

    def _calibrate_magcache(self) -> list[float]:
        """MagCache's magnitude ratios from one plain call on the first prompt at full steps."""
        config = self.config

        def run_once():
            self.pipe(self.prompts[:1], num_inference_steps=config.steps, height=config.height,
                      width=config.width, guidance_scale=config.guidance_scale,
                      generator=torch.Generator("cpu").manual_seed(prompt_seed(config.seed, 0)),
                      output_type="latent")

        ratios = magcache.calibrate(self.pipe, config.steps, run_once)
        logger.info("MagCache calibrated over %d steps", len(ratios))
        return ratios

    def time_setting(self, setting: Mapping) -> tuple[float, list[float]]:
        """Time a setting alone (no scoring): (seconds per image, per-batch seconds per image)."""
        with self.apply(setting) as applied:
            batches = list(self._generate(applied.combo, applied))
        total = sum(batch.seconds for batch in batches)
        return total / len(self.prompts), [batch.seconds_per_image for batch in batches]

    def compare(self, setting: Mapping, baseline: Baseline,
                stop_when: Callable[[Comparison], str | None] | None = None,
                keep_images: int = 0) -> Comparison:
        """Measure `setting` batch by batch; `stop_when(partial)` may end it early (it returns the
        reason, or None to go on; see early_stop.py).

        The 8-bit images of the first `keep_images` prompts are kept in `result.images`.
        """
        wall_start = time.perf_counter()
        result = Comparison(
            setting={}, num_samples=len(self.prompts), batch_size=self.config.batch_size,
            n_batches=self.n_batches, confidence=self.confidence,
            baseline_seconds_per_image=baseline.seconds_per_image,
            baseline_batch_seconds=list(baseline.batch_seconds),
        )
        with self.apply(setting) as applied:
            result.setting = applied.setting
            for batch in self._generate(applied.combo, applied,
                                        on_warmup=lambda s: setattr(result, "warmup_seconds", s)):
                result.inference_seconds += batch.seconds
                result.batch_seconds.append(batch.seconds_per_image)
                if (fraction := applied.computed_fraction()) is not None:
                    result.compute_fractions.append(fraction)
                self._score(result, batch, baseline, keep_images)
                result.batches_evaluated += 1
                if stop_when is not None and result.batches_evaluated < self.n_batches:
                    result.early_stop_reason = stop_when(result)
                    if result.early_stop_reason is not None:
                        result.early_stopped = True
                        break
        result.wall_seconds = time.perf_counter() - wall_start
        return result

    def _score(self, result: Comparison, batch: Batch, baseline: Baseline,
               keep_images: int) -> None:
        start = time.perf_counter()
        scores, features = self.scorer.score(batch.images, [self.prompts[i] for i in batch.indices])
        span = slice(batch.indices.start, batch.indices.stop)
        cosine = (features * baseline.image_features[span].to(features.device)).sum(-1)
        structural = ssim_batch(baseline.images[span], batch.images, self.scorer.device)
        for offset, index in enumerate(batch.indices):
            image, reference = batch.images[offset], baseline.images[index]
            result.clip_scores.append(float(scores[offset]))
            result.baseline_clip_scores.append(float(baseline.clip_scores[index]))
            result.psnr.append(psnr(reference, image))
            result.ssim.append(structural[offset])
            result.clip_image_cosine.append(float(cosine[offset]))
            result.image_digests.append(image_digest(image))
            if index < keep_images:
                result.images.append(image)
        result.scoring_seconds += time.perf_counter() - start


def check_families(pipe, spec) -> None:
    """Every combo the spec searches must apply to the pipeline as loaded (its kind was told from
    the model id before loading; a wrong guess ends here, before anything is measured)."""
    kind = pipeline_kind(pipe)
    for combo in spec.search.combos:
        problem = combo_problem(combo, kind) or pipeline_problem(combo, pipe)
        if problem is None and kind == "transformer" and set(combo) - {"steps", "dbcache"} \
                and not hasattr(denoiser(pipe), "enable_cache"):
            problem = (f"{combo_name(combo)} needs diffusers' enable_cache, which "
                       f"{type(denoiser(pipe)).__name__} lacks (only steps applies)")
        if problem:
            raise ModelLoadError(f"model {spec.model.id!r}: {problem}; set model.kind if it was "
                                 "told wrongly from the id")


def pipeline_from_spec(spec, device: str | None = None):
    """Load the spec's pipeline (on `device` when given) and check its combos apply to it."""
    model = spec.model
    pipe = load_pipeline(model.id, device or model.device, model.dtype, model.scheduler,
                         kind=None if model.kind == "auto" else model.kind,
                         factory_path=model.factory_path)
    check_families(pipe, spec)
    return pipe


def evaluator_from_spec(spec, device: str | None = None, progress: bool = False,
                        prompts: list[str] | None = None, pipe=None) -> Evaluator:
    """Load the spec's pipeline (or take `pipe`, already built), CLIP model and prompts (or
    `prompts`) once, for any number of comparisons."""
    if prompts is None:
        prompts = prompts_of(spec.prompts)
    if pipe is None:
        pipe = pipeline_from_spec(spec, device)
    else:
        check_families(pipe, spec)
    scorer = ClipScorer(spec.quality.clip_model, spec.quality.clip_pretrained, pipe.device)
    return Evaluator(pipe, scorer, prompts, GenerationConfig.from_spec(spec),
                     spec.quality.confidence, progress)
