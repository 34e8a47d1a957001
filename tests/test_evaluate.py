"""Batched generation: per-prompt seeds make images independent of batch size; timing; early stop."""

from __future__ import annotations

import numpy as np
import pytest

from optsearch.evaluate import (
    Comparison,
    Evaluator,
    GenerationConfig,
    early_stop_rule,
    generate,
    n_batches,
)
from optsearch.prompts import load_prompts

PROMPTS = load_prompts("builtin", 5)
ACCELERATED = {"deepcache": {"cache_interval": 3, "cache_branch_id": 0},
               "tome": {"ratio": 0.5, "use_rand": True}}


def images_at(pipe, batch_size, setting=None, prompts=PROMPTS, seed=7):
    from optsearch.accelerators import AppliedSetting

    config = GenerationConfig(steps=8, batch_size=batch_size, seed=seed)
    if setting is None:
        return np.concatenate([b.images for b in generate(pipe, prompts, config, warmup=False)])
    with AppliedSetting(pipe, setting) as applied:
        batches = generate(pipe, prompts, config, setting=applied, warmup=False)
        return np.concatenate([b.images for b in batches])


@pytest.mark.parametrize("setting", [None, ACCELERATED], ids=["baseline", "deepcache+tome"])
def test_images_do_not_depend_on_batch_size(tiny_pipe, setting):
    by_size = {size: images_at(tiny_pipe, size, setting).astype(int) for size in (1, 2, 3)}
    for size in (2, 3):
        assert np.abs(by_size[size] - by_size[1]).max() <= 2, f"batch size {size} changed images"
    other_seed = images_at(tiny_pipe, 2, setting, seed=8).astype(int)
    assert np.abs(other_seed - by_size[1]).max() > 40
    assert np.abs(by_size[1][0] - by_size[1][1]).max() > 40  # different prompts differ a lot


def test_batches_timing_and_warmup(tiny_pipe):
    calls = []
    original = type(tiny_pipe).__call__

    class Counting:
        def __call__(self, *args, **kwargs):
            calls.append(len(args[0]))
            return original(tiny_pipe, *args, **kwargs)

    config = GenerationConfig(steps=4, batch_size=2)
    batches = list(generate(tiny_pipe, PROMPTS, config, setting=_Call(Counting())))
    assert [len(b.indices) for b in batches] == [2, 2, 1]  # ceil(5 / 2), last one short
    assert calls == [2, 2, 2, 1]  # one untimed warm-up batch first
    assert all(b.seconds > 0 and b.images.dtype == np.uint8 for b in batches)
    assert n_batches(32, 4) == 8 and n_batches(5, 2) == 3


class _Call:
    """A stand-in applied setting around a callable (reseed is a no-op)."""

    def __init__(self, call):
        self.call = call

    def reseed(self, seed):
        pass

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)


def test_compare_reports_speedup_and_paired_metrics(tiny_pipe, tiny_clip):
    evaluator = Evaluator(tiny_pipe, tiny_clip, PROMPTS[:4], GenerationConfig(steps=8, batch_size=2))
    baseline = evaluator.baseline()
    result = evaluator.compare(ACCELERATED, baseline)
    summary = result.summary()
    assert result.batches_evaluated == 2 and len(result.psnr) == 4 and not result.early_stopped
    assert summary["speedup"] == pytest.approx(baseline.seconds_per_image / result.seconds_per_image)
    assert summary["clip_loss"]["mean"] == pytest.approx(
        float(np.mean(baseline.clip_scores - np.array(result.clip_scores))), abs=1e-6)
    assert 0 < summary["psnr"]["mean"] < 100 and summary["ssim"]["mean"] < 1
    same = evaluator.compare({}, baseline)
    assert same.summary()["psnr"]["mean"] == 100.0 and same.clip_loss_per_prompt.max() == 0


def test_early_stop_rule_uses_the_interval():
    partial = Comparison(setting={}, num_samples=8, batch_size=2, n_batches=4, confidence=0.95,
                         baseline_seconds_per_image=1.0, batches_evaluated=1,
                         psnr=[20.0, 21.0], clip_scores=[1.0, 1.0],
                         baseline_clip_scores=[1.0, 1.0])
    rule = early_stop_rule("psnr", 30.0, min_batches=2)
    assert not rule(partial)  # too few batches yet
    partial.batches_evaluated = 2
    partial.psnr += [20.5, 20.2]
    partial.clip_scores += [1.0, 1.0]
    partial.baseline_clip_scores += [1.0, 1.0]
    assert rule(partial)
    assert not early_stop_rule("psnr", 20.0, min_batches=2)(partial)
    assert not early_stop_rule("clip_loss", 0.3, min_batches=2)(partial)
    # Bonferroni over 4 looks: 95 % per look would stop at 21.3 dB, 98.75 % per look does not.
    upper_95 = partial.interval("psnr").high
    assert upper_95 < 21.3 and not early_stop_rule("psnr", 21.3, min_batches=2)(partial)


def test_compare_stops_early_and_counts_batches(tiny_pipe, tiny_clip):
    prompts = load_prompts("builtin", 6)
    evaluator = Evaluator(tiny_pipe, tiny_clip, prompts, GenerationConfig(steps=8, batch_size=1))
    baseline = evaluator.baseline()
    rule = early_stop_rule("psnr", 99.0, min_batches=3)  # nothing accelerated reaches 99 dB
    result = evaluator.compare({"deepcache": {"cache_interval": 4}}, baseline, stop_when=rule)
    assert result.early_stopped and result.batches_evaluated == 3 and len(result.psnr) == 3
