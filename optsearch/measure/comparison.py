"""A measurement's record in memory: the baseline, and one setting compared with it prompt by
prompt (what a trial stores, through storage/record.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from optsearch.accelerators import combo_name
from optsearch.measure.metrics import METRICS, OPTIONAL, Interval, prompt_statistic, value_range
from optsearch.measure.speedup import PassNoise, SpeedupInterval, speedup_interval

if TYPE_CHECKING:  # a trial's record is read without torch (`study show`, `export`)
    import torch

# What a video's record adds to an image's (measured in frames.py), each per prompt.
VIDEO_FIGURES = ("psnr_worst_frame", "ssim_worst_frame", "temporal_change")


@dataclass
class Baseline:
    """The plain pipeline's images (or videos), timing and CLIP scores: what every setting is
    compared with.

    `batch_seconds` holds each timed batch's seconds per image (per video: "image" stands for one
    prompt's output throughout), for the speedup interval.
    """

    images: np.ndarray
    seconds_per_image: float
    clip_scores: np.ndarray
    image_features: torch.Tensor
    batch_seconds: list[float] = field(default_factory=list)
    peak_memory_gib: float | None = None  # during its timed batches (memory.py)
    warmup_seconds: float = 0.0  # its untimed warm-up call (a compiled pipeline's: the compile)
    # timed against kept images (`scored`): this pass's own images against them, the worst
    # prompt's PSNR (quality.PSNR_CAP: identical, as on any CPU)
    agreement_psnr: float | None = None

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
    lpips: list[float] = field(default_factory=list)  # where the spec asks (perceptual.py)
    image_digests: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    calibration_used: dict = field(default_factory=dict)  # what the setting ran with (MagCache's ratios)
    compute_fractions: list[float] = field(default_factory=list)  # per batch, where reported
    frames: int = 1  # frames per prompt: more than one for a video pipeline
    # videos only (frames.py): per prompt, the worst frame's PSNR and SSIM and the temporal change
    psnr_worst_frame: list[float] = field(default_factory=list)
    ssim_worst_frame: list[float] = field(default_factory=list)
    temporal_change: list[float] = field(default_factory=list)
    pass_noise: PassNoise | None = None  # the device's pass-level timing noise, in every interval
    peak_memory_gib: float | None = None  # during the timed batches (memory.py)
    baseline_peak_memory_gib: float | None = None
    compiled: str | None = None  # how the denoiser was compiled (compiling.py), None: eager
    graphs_compiled: int | None = None  # in the untimed warm-up
    compiled_while_timed: int | None = None  # graphs compiled inside timed batches
    graph_breaks: int | None = None

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
    def seconds_per_frame(self) -> float | None:
        return self.seconds_per_image / self.frames if self.frames > 1 else None

    @property
    def speedup(self) -> float:
        return self.baseline_seconds_per_image / self.seconds_per_image

    @property
    def speedup_interval(self) -> SpeedupInterval:
        return self.speedup_interval_at(self.confidence)

    def batch_done(self, stop_when: Callable[[Comparison], str | None] | None) -> bool:
        """Count a measured batch and ask `stop_when` (before the last batch) whether to stop;
        True when the measurement ends here, its reason recorded."""
        self.batches_evaluated += 1
        if stop_when is None or self.batches_evaluated >= self.n_batches:
            return False
        self.early_stop_reason = stop_when(self)
        self.early_stopped = self.early_stop_reason is not None
        return self.early_stopped

    def speedup_interval_at(self, confidence: float, pooled: bool = False) -> SpeedupInterval:
        return speedup_interval(self.baseline_batch_seconds, self.batch_seconds, confidence,
                                self.speedup, pooled, self.pass_noise)

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
        """The per-prompt values of `clip_loss`, `psnr`, `ssim` (or a video figure) so far."""
        return self.clip_loss_per_prompt if metric == "clip_loss" else getattr(self, metric)

    def metrics(self) -> list[str]:
        """The metrics this measurement holds: every one but those measured only when asked."""
        return [m for m in METRICS if m not in OPTIONAL or len(self.per_prompt(m))]

    def interval(self, metric: str, confidence: float | None = None) -> Interval:
        """The mean and confidence interval of a metric over the prompts measured so far."""
        return Interval.of(self.per_prompt(metric), confidence or self.confidence,
                           within=value_range(metric))

    def prompt_statistics(self) -> dict[str, float]:
        """Each metric's worst prompt and 10th percentile on the bad side: `<metric>_worst`,
        `<metric>_p10` (what `[quality] statistic` may hold to the limit)."""
        return {f"{metric}_{statistic}": prompt_statistic(self.per_prompt(metric), metric, statistic)
                for metric in self.metrics() for statistic in ("worst", "p10")}

    def compile_figures(self) -> dict:
        """What compiling cost this measurement (compiling.py); {} for an eager pipeline."""
        if not self.compiled:
            return {}
        return {"compiled": self.compiled, "compile_seconds": self.warmup_seconds,
                "graphs_compiled": self.graphs_compiled, "graph_breaks": self.graph_breaks,
                "compiled_while_timed": self.compiled_while_timed}

    def video_intervals(self) -> dict[str, Interval]:
        """The video figures (worst frame, temporal change) with their intervals; {} for images."""
        return {name: self.interval(name) for name in VIDEO_FIGURES if getattr(self, name)}

    def summary(self) -> dict:
        """The figures a user reads and a trial records (each metric an `Interval`); per-prompt
        values, and plain dicts for JSON, are in `to_dict`."""
        video = {} if self.frames == 1 else {"frames": self.frames,
                                             "seconds_per_frame": self.seconds_per_frame,
                                             **self.video_intervals()}
        return {
            "combo": self.combo,
            "setting": self.setting,
            **self.speedup_interval.to_dict(),
            **(self.pass_noise.to_dict() if self.pass_noise is not None else {}),
            "seconds_per_image": self.seconds_per_image,
            "baseline_seconds_per_image": self.baseline_seconds_per_image,
            "clip_mean": self.clip_mean,
            "baseline_clip_mean": float(np.mean(self.baseline_clip_scores)),
            **{metric: self.interval(metric) for metric in self.metrics()},
            **self.prompt_statistics(),
            **video,
            "clip_image_cosine": float(np.mean(self.clip_image_cosine)),
            "compute_fraction": self.compute_fraction,
            **self.compile_figures(),
            "peak_memory_gib": self.peak_memory_gib,
            "baseline_peak_memory_gib": self.baseline_peak_memory_gib,
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
            **({"lpips": self.lpips} if self.lpips else {}),
            "image_digests": self.image_digests,
            **{name: getattr(self, name) for name in VIDEO_FIGURES if getattr(self, name)},
        }
        timing = {"batch_seconds": self.batch_seconds,
                  "baseline_batch_seconds": self.baseline_batch_seconds}
        summary = {key: value.to_dict() if isinstance(value, Interval) else value
                   for key, value in self.summary().items()}
        return {**summary, "per_prompt": per_prompt, "per_batch": timing}


def image_digest(image: np.ndarray) -> str:
    """A short hash of an 8-bit image: lets anyone check a reproduction is bit-exact."""
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]
