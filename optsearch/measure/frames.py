"""Frame-level quality of videos: each prompt's video compared with the baseline's frame by frame.

A video gets one value per figure, so the paired intervals across prompts work as for images:
- PSNR and SSIM: per frame against the baseline's frame, averaged over the frames (the figure the
  quality limit applies to), and the worst frame's, so one broken frame is seen;
- CLIP score: the mean CLIP score of `CLIP_FRAMES` frames sampled evenly (first and last included);
- temporal change: the video's mean frame-to-frame change over the baseline's (1.0 = as steady as
  the baseline; above 1, the setting flickers more, as a cache that reuses stale features can).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from optsearch.measure.quality import ClipScorer, psnr, ssim_batch

CLIP_FRAMES = 4


def sampled_frames(num_frames: int, count: int = CLIP_FRAMES) -> list[int]:
    """`count` frame indices spread evenly over a video, first and last included."""
    return sorted({int(i) for i in np.linspace(0, num_frames - 1, min(count, num_frames)).round()})


def clip_score(scorer: ClipScorer, images: np.ndarray,
               prompts: list[str]) -> tuple[np.ndarray, torch.Tensor]:
    """CLIP scores and image features of a batch of images, or of videos (their sampled frames):
    what every caller that scores a pipeline's output goes through."""
    if images.ndim == 5:
        return clip_score_videos(scorer, images, prompts)
    return scorer.score(images, prompts)


def clip_score_videos(scorer: ClipScorer, videos: np.ndarray,
                      prompts: list[str]) -> tuple[np.ndarray, torch.Tensor]:
    """Per video: the mean CLIP score of its sampled frames, and the normalized mean of their
    image features (what fidelity to the baseline in CLIP space compares)."""
    frames = sampled_frames(videos.shape[1])
    stacked = videos[:, frames].reshape(-1, *videos.shape[2:])
    scores, features = scorer.score(stacked, [p for p in prompts for _ in frames])
    scores = scores.reshape(len(videos), len(frames)).mean(axis=1)
    features = features.reshape(len(videos), len(frames), -1).mean(dim=1)
    return scores, features / features.norm(dim=-1, keepdim=True)


def temporal_change(video: np.ndarray) -> float:
    """Mean absolute change between consecutive frames, in 8-bit levels (0 for one frame)."""
    if len(video) < 2:
        return 0.0
    return float(np.abs(np.diff(video.astype(np.float32), axis=0)).mean())


@dataclass(frozen=True)
class FrameFidelity:
    """One video against the baseline's video of the same prompt."""

    psnr: float
    ssim: float
    psnr_worst_frame: float
    ssim_worst_frame: float
    temporal_change: float


def frame_fidelity(references: np.ndarray, videos: np.ndarray,
                   device: str | torch.device = "cpu") -> list[FrameFidelity]:
    """FrameFidelity of each video of `videos` (N x F x H x W x 3, uint8) against `references`."""
    count, frames = videos.shape[:2]
    flat = (-1, *videos.shape[2:])
    structural = np.asarray(ssim_batch(references.reshape(flat), videos.reshape(flat), device))
    structural = structural.reshape(count, frames)
    results = []
    for index in range(count):
        peak = [psnr(reference, frame) for reference, frame in zip(references[index], videos[index],
                                                                    strict=True)]
        # +1e-3 levels: two frozen videos are equally steady (1.0), not 0/0
        steadiness = (temporal_change(videos[index]) + 1e-3) / (temporal_change(references[index]) + 1e-3)
        results.append(FrameFidelity(float(np.mean(peak)), float(structural[index].mean()),
                                     float(min(peak)), float(structural[index].min()), steadiness))
    return results
