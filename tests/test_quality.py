"""CLIP scoring shapes and pairing, PSNR/SSIM arithmetic, paired confidence intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optsearch.measure.metrics import Interval, t_quantile
from optsearch.measure.quality import PSNR_CAP, psnr, ssim, ssim_batch


def test_clip_scores_pair_each_image_with_its_prompt(tiny_clip):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    prompts = ["a cat", "a red bus", "a bowl of fruit"]
    scores, features = tiny_clip.score(images, prompts)
    assert scores.shape == (3,) and features.shape[0] == 3
    full = 100 * (tiny_clip.image_features(images) @ tiny_clip.text_features(prompts).T)
    expected = full.diagonal().clamp(min=0).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert (scores >= 0).all()
    np.testing.assert_allclose(features.norm(dim=-1).numpy(), 1.0, rtol=1e-5)


def test_psnr_known_values():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 10, np.uint8)
    assert psnr(a, a) == PSNR_CAP
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))


def test_ssim_identity_known_value_and_degradation():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    flat_a, flat_b = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2  # flat images: only the luminance term is left
    expected = (2 * 100 * 150 + c1) / (100**2 + 150**2 + c1)
    assert ssim(flat_a, flat_b) == pytest.approx(expected, abs=1e-4)  # float32 moments
    values = []
    for amplitude in (10, 40, 120):
        noise = rng.integers(-amplitude, amplitude, size=a.shape)
        values.append(ssim(a, np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8)))
    assert values == sorted(values, reverse=True) and values[-1] < 0.8
    pairs = np.stack([a, a]), np.stack([a, np.clip(a.astype(int) + 30, 0, 255).astype(np.uint8)])
    assert ssim_batch(*pairs) == pytest.approx([ssim(a, a), ssim(pairs[0][1], pairs[1][1])])


def test_interval_matches_student_t():
    values = [1.0, 2.0, 3.0, 4.0]
    interval = Interval.of(values)
    half = 3.182 * np.std(values, ddof=1) / 2
    assert interval.mean == 2.5
    assert interval.low == pytest.approx(2.5 - half, rel=1e-3)
    assert interval.high == pytest.approx(2.5 + half, rel=1e-3)
    assert Interval.of([5.0]).low == -math.inf
    assert t_quantile(0.95, 200) == pytest.approx(1.972, abs=2e-3)
    assert t_quantile(0.99, 10) == pytest.approx(3.169, abs=2e-3)


def test_a_figures_interval_stops_where_the_figure_does():
    """SSIM cannot pass 1 nor PSNR its cap: two prompts at 0.994 and 1.0 read [0.956, 1.000],
    not [0.956, 1.038]; the mean and the other bound are the t interval's."""
    from optsearch.measure.comparison import Comparison

    plain = Interval.of([0.994, 1.0])
    comparison = Comparison(setting={}, num_samples=2, batch_size=2, n_batches=1, confidence=0.95,
                            baseline_seconds_per_image=1.0)
    comparison.ssim, comparison.psnr = [0.994, 1.0], [60.0, PSNR_CAP]
    ssim_interval = comparison.interval("ssim")
    assert plain.high > 1.0 and ssim_interval.high == 1.0
    assert (ssim_interval.mean, ssim_interval.low) == (plain.mean, plain.low)
    assert comparison.interval("psnr").high == PSNR_CAP
    comparison.ssim_worst_frame = [0.994, 1.0]
    assert comparison.interval("ssim_worst_frame").high == 1.0
    comparison.clip_scores, comparison.baseline_clip_scores = [30.0, 31.0], [30.5, 30.0]
    assert comparison.interval("clip_loss").low == Interval.of([0.5, -1.0]).low  # unbounded
