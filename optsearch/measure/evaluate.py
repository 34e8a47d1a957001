"""Measuring a setting against the baseline: images, timing and quality, prompt by prompt.

An `Evaluator` holds what one process loaded once (pipeline, CLIP model, prompts) and measures
any number of settings with it; a `Comparison` is one setting's measurement, batch by batch.
CLIP scoring is timed apart from generation.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch

from optsearch.accelerators import (
    AppliedSetting,
    calibrate_under_each,
    calibrated_range,
    calibration_used,
    call_steps,
    distill,
    execution_device,
    magcache,
    missing_conditions,
    normalize_setting,
    pab,
    tome,
)
from optsearch.measure.comparison import VIDEO_FIGURES, Baseline, Comparison, image_digest
from optsearch.measure.compiling import CompileCounter, compiled_as
from optsearch.measure.faults import fault_from_env
from optsearch.measure.frames import clip_score, frame_fidelity
from optsearch.measure.generation import (
    Batch,
    GenerationConfig,
    call_inputs,
    check_conditioning,
    generate,
    n_batches,
)
from optsearch.measure.long_prompts import long_prompts_note, quiet_truncation
from optsearch.measure.memory import PeakMemory
from optsearch.measure.perceptual import Lpips
from optsearch.measure.prompts import prompt_seed, prompts_of
from optsearch.measure.quality import ClipScorer, psnr, ssim_batch
from optsearch.measure.served import check_families, compiled_for, pipeline_from_spec
from optsearch.measure.speedup import PassNoise

logger = logging.getLogger(__name__)


class Evaluator:
    """Everything needed to measure settings in one process: pipeline, CLIP model and prompts.

    The pipeline and CLIP model are loaded once and reused for every setting.
    """

    def __init__(self, pipe, scorer: ClipScorer, prompts: list[str], config: GenerationConfig,
                 confidence: float = 0.95, progress: bool = False, warmup: bool | int = True,
                 calibration: dict[str, dict] | None = None,
                 on_calibrated: Callable[[str, dict], None] | None = None,
                 fault: Callable[[str, int], None] | None = None, warm: set | None = None,
                 lpips: Lpips | None = None, stored: Callable[[], dict] | None = None):
        """`warmup`: the short untimed warm-up (True), none (False), or that many steps.
        `calibration`: per-model data a family needs (MagCache's ratios), measured once when first
        needed; `on_calibrated(name, data)` hears of each new measurement (the worker stores it);
        `stored()`: what other workers on this device stored since, read before measuring anew.
        `fault(combo, batch index)`: called in each timed batch (the fault-injection tests).
        `lpips`: an LPIPS model when the spec measures it (perceptual.py)."""
        distill.keep_between_applies()  # a fused LoRA's CPU copy, once per process, not per trial
        self.pipe = pipe
        self.scorer = scorer
        self.prompts = prompts
        self.config = config
        self.confidence = confidence
        self.progress = progress
        self.warmup = warmup
        self.calibration = dict(calibration or {})
        self.on_calibrated = on_calibrated
        self.stored = stored
        self.fault = fault
        self.lpips = lpips
        # (combo, batch size) pairs this process has already run: nothing of theirs is cold any
        # more (kernels, allocations, patched code paths), so the short warm-up is skipped.
        self.warm: set[tuple[str, int]] = set() if warm is None else warm

    def derive(self, **changes) -> Evaluator:
        """A new evaluator on the same loaded pipeline and CLIP model (and the same record of what
        is warm), with other prompts, config, calibration, callbacks or warm-up."""
        current = {"prompts": self.prompts, "config": self.config, "confidence": self.confidence,
                   "progress": self.progress, "warmup": self.warmup, "calibration": self.calibration,
                   "on_calibrated": self.on_calibrated, "fault": self.fault, "lpips": self.lpips,
                   "stored": self.stored}
        return Evaluator(self.pipe, self.scorer, warm=self.warm, **{**current, **changes})

    @property
    def n_batches(self) -> int:
        return n_batches(len(self.prompts), self.config.batch_size)

    def _warmup_for(self, combo: str) -> bool | int:
        """The warm-up a run of `combo` needs: none when this process already ran it at this batch
        size (measured: timings then match those after a warm-up, benchmarks/RESULTS.md "Warm-up")."""
        if compiled_as(self.pipe):  # a new setting may compile anew: always before timing
            return self.config.steps
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
        peak, warm, agreement = PeakMemory(execution_device(self.pipe)), {"seconds": 0.0}, []
        for batch in peak.measure(self._generate(
                "baseline", on_warmup=lambda seconds: warm.update(seconds=seconds))):
            images.append(batch.images)
            seconds += batch.seconds
            batch_seconds.append(batch.seconds_per_image)
            if scored is not None:  # are the kept images still this pipeline's here?
                agreement += [psnr(scored.images[i], image)
                              for i, image in zip(batch.indices, batch.images, strict=True)]
            else:
                batch_scores, batch_features = clip_score(
                    self.scorer, batch.images, [self.prompts[i] for i in batch.indices])
                scores.append(batch_scores)
                features.append(batch_features)
        seconds_per_image = seconds / len(self.prompts)
        if scored is not None:
            return Baseline(scored.images, seconds_per_image, scored.clip_scores,
                            scored.image_features, batch_seconds, peak.gib, warm["seconds"],
                            agreement_psnr=min(agreement))
        return Baseline(np.concatenate(images), seconds_per_image, np.concatenate(scores),
                        torch.cat(features), batch_seconds, peak.gib, warm["seconds"])

    def apply(self, setting: Mapping) -> AppliedSetting:
        """Apply `setting` to the pipeline, calibrating first what it needs and is not known."""
        families = normalize_setting(setting)
        if "magcache" in families and not self._known("magcache", "mag_ratios"):
            self._calibrated("magcache", self._calibrate_magcache())
        for family, other in (("pab", "fastercache"), ("fastercache", "pab")):  # their windows
            if family in families and not self._known(family, "timesteps"):  # one image, once
                self._calibrated(family, {key: self.calibration[other][key] for key in
                                          ("timesteps", "step_count")} if self._known(other, "timesteps")
                                 else pab.measure_timesteps(self.pipe, self.denoising_steps, self._run_once))
        if "tome" in families and not self._known("tome", "tokens"):  # two steps of one image
            self._calibrated("tome", tome.measure_tokens(
                self.pipe, lambda: self._run_once(1, self.config.steps_denoising(2))))
        return AppliedSetting(self.pipe, setting, self.calibration)

    def _calibrated(self, family: str, measured: dict) -> None:
        """Keep what was measured of a family, and tell `on_calibrated` (the worker stores it)."""
        self.calibration[family] = {**self.calibration.get(family, {}), **measured}
        if self.on_calibrated is not None:
            self.on_calibrated(family, self.calibration[family])

    def _known(self, family: str, key: str) -> bool:
        """Is `key` of the family's calibration known here, or stored since by another worker on
        this device (adopted then: workers started together, or before the first one stored it,
        would otherwise each measure their own)?"""
        if key not in self.calibration.get(family, {}) and self.stored is not None:
            if key in (stored := self.stored().get(family) or {}):
                self.calibration[family] = {**self.calibration.get(family, {}), **stored}
        return key in self.calibration.get(family, {})

    def _run_once(self, prompts: int = 1, steps: int | None = None,
                  through: AppliedSetting | None = None) -> None:
        """One plain call at full steps (or `steps`) on the first `prompts` prompts, with the
        noise the search gives them: what calibrations watch (the first batch computes as every
        trial's does). `through`: a setting the call runs under (a step-distilled LoRA)."""
        config, count = self.config, min(prompts, len(self.prompts))
        with quiet_truncation(self.pipe):  # a long prompt's cut is said once (evaluator_from_spec)
            (through or self.pipe)(**call_inputs(self.prompts[:count], self.pipe),
                                   num_inference_steps=steps or config.steps,
                                   height=config.height, width=config.width,
                                   generator=[torch.Generator("cpu").manual_seed(
                                       prompt_seed(config.seed, i)) for i in range(count)],
                                   output_type="latent", **config.guidance_kwargs(count, self.pipe))

    def _calibrate_magcache(self) -> dict:
        """MagCache's magnitude ratios (each expert's) from one plain call on the first prompt
        at full steps."""
        measured = magcache.measure(self.pipe, self.denoising_steps, self._run_once)
        logger.info("MagCache calibrated over %d steps", self.denoising_steps)
        return measured

    @property
    def denoising_steps(self) -> int:
        """The steps a full call runs the denoiser for: all, or at an image-to-image strength
        those the pipeline keeps (its own rounding)."""
        return self.denoising_steps_of(self.config.steps)

    def denoising_steps_of(self, steps: int) -> int:
        """The steps a call of `steps` steps runs the denoiser for (`denoising_steps`)."""
        return call_steps(self.pipe, {"num_inference_steps": steps, "strength": self.config.strength})

    def auto_ranges(self, spec) -> dict[str, list]:
        """The calibrated ranges of the spec's "auto" parameters, {"family.param": [lo, hi]}:
        each family measured once on this device, on each model its trials run it on (plain
        calls on the search's first batch at each step count `spec.calibration_conditions`
        names, the plain model's and each step-distilled LoRA's), then kept with the rest of the
        calibration (the worker stores it in the study per device fingerprint)."""
        ranges = {}
        for family, param in spec.auto_params():
            conditions = spec.calibration_conditions(family)
            if self._uncalibrated(family, conditions):
                count = min(self.config.batch_size, len(self.prompts))
                self._calibrated(family, calibrate_under_each(
                    family, self.pipe,
                    lambda steps, under: self._run_once(self.config.batch_size, steps, under),
                    spec.searched_values(family), conditions,
                    self.config.guidance_kwargs(count, self.pipe), self.calibration.get(family)))
            if param in self.calibration[family].get("auto", {}):
                ranges[f"{family}.{param}"] = calibrated_range(family, self.calibration[family], param)
        return ranges

    def calibration_images(self, spec) -> float:
        """Images' worth of plain calls the spec's "auto" ranges still need on this device (none
        once stored): what the estimate adds before the first trial."""
        pending = {family: self._uncalibrated(family, spec.calibration_conditions(family))
                   for family, _ in spec.auto_params()}
        return self.config.batch_size * spec.calibration_calls(pending)

    def _uncalibrated(self, family: str, conditions: list) -> list:
        """Those of `conditions` (the models: plain, each LoRA) the family's "auto" range is still
        to be calibrated on here: none once this worker, or another on the device (adopted),
        stored them."""
        self._known(family, "auto")
        return missing_conditions(conditions, self.calibration.get(family, {}))

    def time_setting(self, setting: Mapping) -> tuple[float, list[float]]:
        """Time a setting alone (no scoring): (seconds per image, per-batch seconds per image)."""
        with self.apply(setting) as applied:
            batches = list(self._generate(applied.combo, applied))
        total = sum(batch.seconds for batch in batches)
        return total / len(self.prompts), [batch.seconds_per_image for batch in batches]

    def probe(self) -> float:
        """Seconds per image of one batch of the plain pipeline (no warm-up, no scoring): how fast
        the device runs now, between trials (optimize/pass_noise.py)."""
        prompts = self.prompts[:self.config.batch_size]
        [batch] = list(generate(self.pipe, prompts, self.config, warmup=False))
        return batch.seconds_per_image

    def compare(self, setting: Mapping, baseline: Baseline,
                stop_when: Callable[[Comparison], str | None] | None = None,
                keep_images: int = 0, pass_noise: PassNoise | None = None) -> Comparison:
        """Measure `setting` batch by batch; `stop_when(partial)` may end it early (it returns the
        reason, or None to go on; see early_stop.py).

        The 8-bit images of the first `keep_images` prompts are kept in `result.images`.
        """
        wall_start = time.perf_counter()
        result = Comparison(
            setting={}, num_samples=len(self.prompts), batch_size=self.config.batch_size,
            n_batches=self.n_batches, confidence=self.confidence,
            baseline_seconds_per_image=baseline.seconds_per_image,
            baseline_batch_seconds=list(baseline.batch_seconds), pass_noise=pass_noise,
            baseline_peak_memory_gib=baseline.peak_memory_gib,
        )
        peak = PeakMemory(execution_device(self.pipe))
        result.compiled = compiled_as(self.pipe)
        compiles = CompileCounter() if result.compiled else None

        def warmed_up(seconds: float) -> None:
            result.warmup_seconds = seconds
            if compiles is not None:
                compiles.warmed_up()

        with self.apply(setting) as applied:
            result.setting = applied.setting
            result.calibration_used = calibration_used(applied.setting, self.calibration)
            batches = self._generate(applied.combo, applied, on_warmup=warmed_up)
            for batch in peak.measure(batches):
                result.inference_seconds += batch.seconds
                result.batch_seconds.append(batch.seconds_per_image)
                if (fraction := applied.computed_fraction()) is not None:
                    result.compute_fractions.append(fraction)
                self._score(result, batch, baseline, keep_images)
                if result.batch_done(stop_when):
                    break
            result.peak_memory_gib = peak.gib
            for name, told in applied.ran_with().items():  # a deployment sets it too (export)
                result.calibration_used[name] = {**result.calibration_used.get(name, {}), **told}
        if compiles is not None:
            for name, count in compiles.counts().items():
                setattr(result, name, count)
        result.wall_seconds = time.perf_counter() - wall_start
        return result

    def _score(self, result: Comparison, batch: Batch, baseline: Baseline,
               keep_images: int) -> None:
        start = time.perf_counter()
        scores, features = clip_score(
            self.scorer, batch.images, [self.prompts[i] for i in batch.indices])
        span = slice(batch.indices.start, batch.indices.stop)
        cosine = (features * baseline.image_features[span].to(features.device)).sum(-1)
        if batch.images.ndim == 5:  # videos: frame by frame (frames.py)
            result.frames = batch.images.shape[1]
            videos = frame_fidelity(baseline.images[span], batch.images, self.scorer.device)
            for figure in VIDEO_FIGURES:
                getattr(result, figure).extend(getattr(video, figure) for video in videos)
            peak, structural = [v.psnr for v in videos], [v.ssim for v in videos]
        else:
            peak = [psnr(baseline.images[i], image) for i, image in zip(batch.indices, batch.images,
                                                                          strict=True)]
            structural = ssim_batch(baseline.images[span], batch.images, self.scorer.device)
        if self.lpips is not None:
            result.lpips.extend(self.lpips.distances(baseline.images[span], batch.images))
        for offset, index in enumerate(batch.indices):
            image = batch.images[offset]
            result.clip_scores.append(float(scores[offset]))
            result.baseline_clip_scores.append(float(baseline.clip_scores[index]))
            result.psnr.append(peak[offset])
            result.ssim.append(structural[offset])
            result.clip_image_cosine.append(float(cosine[offset]))
            result.image_digests.append(image_digest(image))
            if index < keep_images:
                result.images.append(image)
        result.scoring_seconds += time.perf_counter() - start


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
        compiled_for(spec, pipe)
    check_conditioning(pipe, prompts, spec.prompts.batch_size)
    note = long_prompts_note(pipe, prompts)
    if note is not None:
        warnings.warn(note, stacklevel=2)
    scorer = ClipScorer(spec.quality.clip_model, spec.quality.clip_pretrained,
                        execution_device(pipe))
    lpips = Lpips(execution_device(pipe)) if spec.quality.measures_lpips else None
    return Evaluator(pipe, scorer, prompts, GenerationConfig.from_spec(spec),
                     spec.quality.confidence, progress, fault=fault_from_env(), lpips=lpips)
