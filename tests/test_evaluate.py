"""Batched generation: per-prompt seeds make images independent of batch size; timing; early stop."""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import numpy as np
import pytest

from optsearch.measure.evaluate import Comparison, Evaluator
from optsearch.measure.generation import GenerationConfig, generate, n_batches
from optsearch.measure.metrics import Interval, t_quantile
from optsearch.measure.prompts import load_prompts
from optsearch.measure.speedup import SpeedupInterval, first_batch_interval
from optsearch.optimize.early_stop import EarlyStop, FrontPoint, selected_maximum_shift
from optsearch.optimize.evidence import FirstBatches, PromptEffects
from optsearch.optimize.sequential import per_look_alpha

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
            calls.append((len(kwargs["prompt"]), kwargs["num_inference_steps"]))
            return original(tiny_pipe, *args, **kwargs)

    config = GenerationConfig(steps=4, batch_size=2)
    batches = list(generate(tiny_pipe, PROMPTS, config, setting=_Call(Counting())))
    assert [len(b.indices) for b in batches] == [2, 2, 1]  # ceil(5 / 2), last one short
    # one short untimed warm-up first: the first batch's shape, 3 of the 4 steps
    assert calls == [(2, 3), (2, 4), (2, 4), (1, 4)]
    assert all(b.seconds > 0 and b.images.dtype == np.uint8 for b in batches)
    assert n_batches(32, 4) == 8 and n_batches(5, 2) == 3


class _Call:
    """A stand-in applied setting around a callable (reseed is a no-op)."""

    def __init__(self, call):
        self.call = call

    warmup_steps = 0

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
    # timed batch by batch, equal batches: the speedup is the ratio of the mean batch seconds
    assert len(result.batch_seconds) == len(baseline.batch_seconds) == 2
    assert summary["speedup"] == pytest.approx(np.mean(baseline.batch_seconds)
                                               / np.mean(result.batch_seconds), rel=1e-6)
    assert summary["clip_loss"].mean == pytest.approx(
        float(np.mean(baseline.clip_scores - np.array(result.clip_scores))), abs=1e-6)
    assert 0 < summary["psnr"].mean < 100 and summary["ssim"].mean < 1
    same = evaluator.compare({}, baseline)
    assert same.summary()["psnr"].mean == 100.0 and same.clip_loss_per_prompt.max() == 0


def test_a_baseline_timed_against_kept_images_says_whether_it_made_the_same(tiny_pipe, tiny_clip):
    """A worker times its own baseline but keeps the images stored for its device: the pass says
    how far its own images are from them (the worst prompt's PSNR; 100: identical)."""
    evaluator = Evaluator(tiny_pipe, tiny_clip, PROMPTS[:4], GenerationConfig(steps=4, batch_size=2))
    first = evaluator.baseline()
    assert first.agreement_psnr is None  # nothing kept to agree with
    again = evaluator.baseline(scored=first)
    assert again.agreement_psnr == 100.0 and again.images is first.images
    drifted = first.images.copy()
    drifted[3, :8] = 255 - drifted[3, :8]  # one prompt's top rows differ
    kept = dataclasses.replace(first, images=drifted)
    worst = evaluator.baseline(scored=kept).agreement_psnr
    assert 0 < worst < 40


def early_stop_rule(metric: str, limit: float, min_batches: int) -> EarlyStop:
    return EarlyStop(metric, min_batches, quality_limit=limit)


def test_early_stop_rule_uses_the_interval():
    partial = Comparison(setting={}, num_samples=8, batch_size=2, n_batches=4, confidence=0.95,
                         baseline_seconds_per_image=1.0, batches_evaluated=1,
                         psnr=[20.0, 21.0], clip_scores=[1.0, 1.0],
                         baseline_clip_scores=[1.0, 1.0])
    rule = early_stop_rule("psnr", 30.0, min_batches=2)
    assert rule(partial) is None  # too few batches yet
    partial.batches_evaluated = 2
    partial.psnr += [20.5, 20.2]
    partial.clip_scores += [1.0, 1.0]
    partial.baseline_clip_scores += [1.0, 1.0]
    assert rule(partial) == "quality"
    assert early_stop_rule("psnr", 20.0, min_batches=2)(partial) is None
    assert early_stop_rule("clip_loss", 0.3, min_batches=2)(partial) is None
    # two looks (after 4 and 6 prompts) share alpha 0.05 on their real correlation: 0.0331 each
    # (Bonferroni: 0.025), one-sided: the t bound of the prompts' mean, 21.04 dB, not narrowed
    # because 4 of the 8 prompts are known: prompts come in a fixed order, and a late one easier
    # than the first would make a narrowed bound miss (benchmarks/RESULTS.md 10e).
    assert per_look_alpha(0.05, [4, 6]) == pytest.approx(0.0331, abs=5e-4)
    bound = Interval.of(partial.psnr, 1 - 2 * per_look_alpha(0.05, [4, 6])).high
    assert bound == pytest.approx(21.04, abs=0.01)
    assert early_stop_rule("psnr", 21.06, min_batches=2)(partial) == "quality"
    assert early_stop_rule("psnr", 21.02, min_batches=2)(partial) is None
    bonferroni = EarlyStop("psnr", 2, quality_limit=21.06, boundary="bonferroni")
    assert bonferroni(partial) is None  # its bound, 21.33 dB, waits


def test_the_sequential_per_look_alpha_spends_alpha_on_the_looks_real_correlation():
    # one look: all of alpha; more looks: between Bonferroni's alpha / looks and alpha
    assert per_look_alpha(0.05, [3]) == 0.05
    assert per_look_alpha(0.05, []) == 0.05
    seven = per_look_alpha(0.05, range(1, 8))
    assert 0.05 / 7 < seven < 0.05
    assert seven == pytest.approx(0.0137, abs=5e-4)  # Pocock, one-sided, 7 equal looks
    # a fixed set of 8 items (the last look would know the mean): looks less correlated, less each
    assert 0.05 / 7 < per_look_alpha(0.05, range(1, 8), total=8) < seven
    # looks at or past the fixed set's size are not looks
    assert per_look_alpha(0.05, [2, 4, 6, 8], total=8) == per_look_alpha(0.05, [2, 4, 6], total=8)
    # simulated: with the per-look alpha, some look of a random walk crosses with chance alpha
    rng = np.random.default_rng(1)
    walks = rng.standard_normal((20_000, 7)).cumsum(axis=1) / np.sqrt(np.arange(1, 8))
    crossed = (walks > NormalDist().inv_cdf(1 - seven)).any(axis=1).mean()
    assert crossed == pytest.approx(0.05, abs=0.005)


EFFECTS = np.array([-3.0, 2.0, 1.0, -1.0, 0.5, -0.5, 3.0, -2.0])  # sum 0: each prompt's own PSNR


def earlier_trials(count: int) -> list[np.ndarray]:
    """Trials at 30-34 dB whose prompts differ by EFFECTS, with +-0.1 dB of residual noise."""
    noise = 0.1 * np.array([1, -1, 1, -1, -1, 1, -1, 1])
    return [30.0 + k + EFFECTS + noise * (-1) ** k for k in range(count)]


def psnr_partial(values: list[float]) -> Comparison:
    """8 prompts in 8 batches of 1, the first len(values) measured."""
    return Comparison(setting={}, num_samples=8, batch_size=1, n_batches=8, confidence=0.95,
                      baseline_seconds_per_image=1.0, batches_evaluated=len(values),
                      psnr=list(values), clip_scores=[1.0] * len(values),
                      baseline_clip_scores=[1.0] * len(values))


def test_prompt_effects_of_earlier_trials_let_the_quality_look_decide_after_two_prompts():
    assert PromptEffects.of(earlier_trials(4)) is None  # too few to know how residuals spread
    effects = PromptEffects.of(earlier_trials(5))
    assert np.allclose(effects.effects, EFFECTS, atol=0.1)
    first_two = psnr_partial(list(28.0 + EFFECTS[:2]))  # a 28 dB trial: 25 and 30 dB so far
    plain = EarlyStop("psnr", quality_limit=30.0)
    assert plain(first_two) is None  # 2 prompts 5 dB apart: the plain look cannot decide
    sharp = EarlyStop("psnr", quality_limit=30.0, prompt_effects=effects)
    assert sharp(first_two) == "quality"
    # the bound: t at (K-1)(N-1) df, the earlier trials' 90th-percentile residual variance, the
    # unknown 6 of 8 prompts and the effects' own error from 5 trials
    per_look = 1 - 2 * per_look_alpha(0.05, range(1, 8), total=8)  # 7 looks at the 8 prompts' mean
    variance = np.percentile(effects.residual_variances, 90) * (1 / 2 - 1 / 8) * (1 + 1 / 5)
    high = 28.0 + t_quantile(per_look, 4 * 7) * np.sqrt(variance)
    assert effects.interval(first_two.psnr, per_look).high == pytest.approx(high)
    assert EarlyStop("psnr", quality_limit=high + 0.01, prompt_effects=effects)(first_two) == "quality"
    assert EarlyStop("psnr", quality_limit=high - 0.01, prompt_effects=effects)(first_two) is None
    # a trial whose prompts scatter more than the earlier trials' widens its own interval
    scattered = psnr_partial(list(np.array([26.0, 27.0, 31.0]) + EFFECTS[:3]))
    assert sharp(psnr_partial(scattered.psnr[:2])) == "quality"  # alone, its first two would stop
    assert sharp(scattered) is None
    # effects of another prompt set (other num_samples) are not used
    other = PromptEffects.of([row[:6] for row in earlier_trials(5)])
    assert EarlyStop("psnr", quality_limit=30.0, prompt_effects=other)(first_two) is None


def test_a_study_that_learned_its_prompts_stops_an_infeasible_trial_at_the_first_look(tiny_pipe,
                                                                                       tiny_clip):
    """Real images: five settings measured on all 8 prompts teach each prompt's own PSNR; a lossier
    setting whose mean is clearly under the limit then stops after its first batch (1 prompt),
    where the plain look needs more."""
    prompts = load_prompts("builtin", 8)
    evaluator = Evaluator(tiny_pipe, tiny_clip, prompts, GenerationConfig(steps=8, batch_size=1))
    baseline = evaluator.baseline()
    earlier = [{"deepcache": {"cache_interval": n, "cache_branch_id": 1}} for n in (2, 3, 4, 5, 6)]
    rows = [evaluator.compare(setting, baseline).psnr for setting in earlier]
    lossy = {"deepcache": {"cache_interval": 3, "cache_branch_id": 0},
             "tome": {"ratio": 0.6, "use_rand": False}}
    final = evaluator.compare(lossy, baseline)
    limit = float(np.mean(final.psnr)) + 1.0  # infeasible by 1 dB
    plain = evaluator.compare(lossy, baseline, stop_when=EarlyStop("psnr", quality_limit=limit))
    sharp = evaluator.compare(lossy, baseline, stop_when=EarlyStop(
        "psnr", quality_limit=limit, prompt_effects=PromptEffects.of(rows)))
    assert sharp.early_stop_reason == "quality" and sharp.batches_evaluated == 1
    assert plain.batches_evaluated > 2  # one prompt's PSNR alone says nothing of the others
    assert sharp.psnr == final.psnr[:1]  # the same images, fewer of them


def timed_partial(baseline: list[float], setting: list[float], psnr: list[float]) -> Comparison:
    """A partial comparison after len(setting) batches of 2 prompts (of 4 batches)."""
    return Comparison(setting={}, num_samples=8, batch_size=2, n_batches=4, confidence=0.95,
                      baseline_seconds_per_image=float(np.mean(baseline)),
                      baseline_batch_seconds=baseline, batch_seconds=setting,
                      batches_evaluated=len(setting), inference_seconds=2 * sum(setting),
                      psnr=psnr, clip_scores=[1.0] * len(psnr), baseline_clip_scores=[1.0] * len(psnr))


def test_a_best_timed_on_the_same_baseline_is_compared_by_its_seconds():
    """Both speedups divide by one baseline timing: comparing the two trials' seconds removes the
    baseline's noise, which the comparison through the speedups must count twice."""
    baseline = [1.0, 1.02, 0.98, 1.01]
    partial = timed_partial(baseline, [0.5, 0.52], [40.0, 41.0, 40.5, 40.2])
    best_seconds = [0.485, 0.49, 0.485, 0.49]  # 4 % faster than the trial, and steady
    figure = float(np.mean(baseline) / np.mean(best_seconds))
    best = SpeedupInterval(figure, figure * math.exp(-0.02), figure * math.exp(0.02))
    through_speedups = EarlyStop("psnr", quality_limit=30, speedup_to_beat=best)
    assert through_speedups(partial) is None  # within both speedups' noise
    by_seconds = EarlyStop("psnr", quality_limit=30, speedup_to_beat=best, best_batch_seconds=best_seconds)
    assert by_seconds(partial) == "dominated"
    as_fast = EarlyStop("psnr", quality_limit=30, speedup_to_beat=best,
                        best_batch_seconds=[0.5, 0.52, 0.51, 0.5])
    assert as_fast(partial) is None
    noisy = EarlyStop("psnr", quality_limit=30, speedup_to_beat=best,
                      best_batch_seconds=[0.40, 0.58, 0.42, 0.56])  # the same mean, 15 % noise
    assert noisy(partial) is None


def test_speedup_rules_stop_with_their_reason_and_only_when_the_interval_is_clear():
    partial = timed_partial([1.0, 1.02, 0.98, 1.01], [0.5, 0.52], [40.0, 41.0, 40.5, 40.2])
    # two batches; speedup looks after batches 2 and 3 share alpha: one-sided 96.7 % per look;
    # the baseline's noise pooled in
    alpha = per_look_alpha(0.05, [2, 3])
    high = partial.speedup_interval_at(1 - 2 * alpha, pooled=True).high
    assert 2.05 < high < 2.06
    assert EarlyStop("psnr", target_speedup=2.06)(partial) == "speedup"
    assert EarlyStop("psnr", target_speedup=2.05)(partial) is None  # inside the interval
    # Bonferroni's 0.025 per look gives a wider interval (high end 2.064): it would wait
    assert EarlyStop("psnr", target_speedup=2.06, boundary="bonferroni")(partial) is None
    # max-speedup: the trial's and the best's noise add in quadrature (log scale), the best's
    # 95 % half-width rescaled to the look's one-sided alpha
    speedup = partial.speedup
    trial_half = math.log(high / speedup)
    best_half = 0.02  # the best's recorded 95 % interval: exp(-+0.02)
    gap = math.hypot(trial_half, best_half * NormalDist().inv_cdf(1 - alpha) / 1.959964)

    def best_at(log_distance: float) -> SpeedupInterval:
        figure = speedup * math.exp(log_distance)
        return SpeedupInterval(figure, figure * math.exp(-best_half), figure * math.exp(best_half))

    assert best_at(gap + 0.005).low < high  # the old rule (best's low bound vs trial's high) waits
    assert EarlyStop("psnr", quality_limit=30, speedup_to_beat=best_at(gap + 0.005))(partial) == "dominated"
    assert EarlyStop("psnr", quality_limit=30, speedup_to_beat=best_at(gap - 0.005))(partial) is None
    no_interval = SpeedupInterval(speedup * 2, None, None)  # a best from one batch: no noise known
    assert EarlyStop("psnr", quality_limit=30, speedup_to_beat=no_interval)(partial) is None
    better = FrontPoint(speedup_low=high + 0.1, quality_safe=42.0)
    worse_quality = FrontPoint(speedup_low=high + 0.1, quality_safe=40.0)
    assert EarlyStop("psnr", quality_limit=30, front=[better])(partial) == "dominated"
    assert EarlyStop("psnr", quality_limit=30, front=[worse_quality])(partial) is None
    # quality past the limit is checked first; without a first-batch record a speedup look
    # waits for the trial's 2nd batch
    assert EarlyStop("psnr", quality_limit=45, target_speedup=3.0)(partial) == "quality"
    one = timed_partial([1.0, 1.02, 0.98, 1.01], [0.5], [40.0, 41.0])
    assert EarlyStop("psnr", target_speedup=3.0)(one) is None
    assert EarlyStop("psnr", quality_limit=60, target_speedup=3.0)(one) == "quality"  # from batch 1
    assert EarlyStop("psnr", 2, quality_limit=60, target_speedup=3.0)(one) is None  # min_batches


STEADY = [0.01, -0.01, 0.0, 0.02, -0.02]  # first batches within 2 % of their trials' later ones


def test_first_batches_record_how_far_first_batches_read_per_kind():
    record = FirstBatches.of([([1.1, 1.0, 1.0], True), ([0.5], False), ([0.9, 1.0], False),
                              ([2.0, 2.0, 2.0, 2.0], False)])
    assert record.after_warmup == pytest.approx((math.log(1.1),))
    assert record.without_warmup == pytest.approx((math.log(0.9), 0.0))  # one batch: says nothing
    assert record.excess(True) is None  # fewer than 5 trials of its kind
    five = FirstBatches(without_warmup=tuple(STEADY))
    assert five.excess(False) == tuple(STEADY) and five.excess(True) is None


def test_first_batch_interval_is_the_records_prediction_interval():
    baseline = [1.0, 1.02, 0.98, 1.01]
    steady = first_batch_interval(baseline, 0.5, STEADY, 0.95)
    assert steady.speedup == pytest.approx(np.mean(baseline) / 0.5)
    record = np.array(STEADY)
    variance = record.var(ddof=1) * (1 + 1 / 5) + np.log(baseline).var(ddof=1) / 4
    assert math.log(steady.high / steady.speedup) > t_quantile(0.95, 100) * math.sqrt(variance)
    assert math.log(steady.high / steady.speedup) < t_quantile(0.95, 4) * math.sqrt(variance)
    # first batches that read 60 % slow on this device: the first batch is corrected by that
    slow = first_batch_interval(baseline, 0.5, [math.log(1.6) + e for e in STEADY], 0.95)
    assert slow.speedup == pytest.approx(steady.speedup * 1.6)
    noisy = first_batch_interval(baseline, 0.5, [0.3, -0.3, 0.2, -0.2, 0.0], 0.95)
    assert noisy.high > 1.5 * steady.high
    # first batches that read fast never make the trial slower than its batch (a record of trials
    # that survived their first batch leans fast); their distance from 0 counts as spread
    fast = first_batch_interval(baseline, 0.5, [e - 0.1 for e in STEADY], 0.95)
    assert fast.speedup == pytest.approx(steady.speedup) and fast.high > steady.high


def test_a_speedup_look_after_the_first_batch_needs_the_devices_first_batch_record():
    one = timed_partial([1.0, 1.02, 0.98, 1.01], [0.5], [40.0, 41.0])  # 2.0x, warmed up: no
    steady = FirstBatches(without_warmup=tuple(STEADY))
    assert EarlyStop("psnr", target_speedup=3.0, first_batches=steady)(one) == "speedup"
    assert EarlyStop("psnr", target_speedup=3.0, speedup_after=2, first_batches=steady)(one) is None
    four = FirstBatches(without_warmup=tuple(STEADY[:4]))
    assert EarlyStop("psnr", target_speedup=3.0, first_batches=four)(one) is None
    other_kind = FirstBatches(after_warmup=tuple(STEADY))  # this trial ran no warm-up
    assert EarlyStop("psnr", target_speedup=3.0, first_batches=other_kind)(one) is None
    slow_first = FirstBatches(without_warmup=tuple(math.log(1.6) + e for e in STEADY))
    assert EarlyStop("psnr", target_speedup=3.0, first_batches=slow_first)(one) is None  # 3.2x
    noisy = FirstBatches(without_warmup=(0.3, -0.3, 0.2, -0.2, 0.0))
    assert EarlyStop("psnr", target_speedup=3.0, first_batches=noisy)(one) is None
    # max-speedup against a best on the same baseline timing: its seconds, the record's noise
    best_seconds = [0.30, 0.31, 0.30, 0.31]
    figure = float(np.mean([1.0, 1.02, 0.98, 1.01]) / np.mean(best_seconds))
    best = SpeedupInterval(figure, figure * 0.98, figure * 1.02)
    rule = EarlyStop("psnr", quality_limit=30, speedup_to_beat=best, first_batches=steady,
                     best_batch_seconds=best_seconds)
    assert rule(one) == "dominated"
    assert dataclasses.replace(rule, first_batches=noisy)(one) is None
    assert dataclasses.replace(rule, best_batch_seconds=None)(one) == "dominated"


def test_compare_stops_early_and_counts_batches(tiny_pipe, tiny_clip):
    prompts = load_prompts("builtin", 6)
    evaluator = Evaluator(tiny_pipe, tiny_clip, prompts, GenerationConfig(steps=8, batch_size=1))
    baseline = evaluator.baseline()
    rule = early_stop_rule("psnr", 99.0, min_batches=3)  # nothing accelerated reaches 99 dB
    result = evaluator.compare({"deepcache": {"cache_interval": 4}}, baseline, stop_when=rule)
    assert result.early_stopped and result.batches_evaluated == 3 and len(result.psnr) == 3


def test_warm_up_only_until_the_process_has_run_the_combo_at_the_batch_size(tiny_pipe, tiny_clip):
    """The short warm-up runs before a combo's first run at a batch size; later runs of that combo
    (other parameters) in the same process skip it; images do not change."""
    prompts = load_prompts("builtin", 2)
    evaluator = Evaluator(tiny_pipe, tiny_clip, prompts, GenerationConfig(steps=6, batch_size=1))
    baseline = evaluator.baseline()
    first = evaluator.compare({"deepcache": {"cache_interval": 3}}, baseline)
    again = evaluator.compare({"deepcache": {"cache_interval": 2}}, baseline)
    other_combo = evaluator.compare({"tgate": {"gate_step": 3}}, baseline)
    assert first.warmup_seconds > 0 and other_combo.warmup_seconds > 0
    assert again.warmup_seconds == 0
    evaluator.warm.clear()
    cold = evaluator.compare({"deepcache": {"cache_interval": 2}}, baseline)
    assert cold.warmup_seconds > 0 and cold.image_digests == again.image_digests
    evaluator = evaluator.derive(config=GenerationConfig(steps=6, batch_size=2))  # a new shape: cold
    assert evaluator.compare({"deepcache": {"cache_interval": 2}}, baseline).warmup_seconds > 0


def test_a_near_tie_is_not_stopped_as_dominated_but_a_clearly_slower_trial_is():
    """`stop_margin`: a trial 3 % slower than the best runs on at a 5 % margin, however tight its
    timing; 20 % slower stops. Both timed against the best's baseline timing (its own seconds)."""
    best_seconds = [1.0, 1.01, 0.99, 1.0]

    def partial(seconds: float) -> Comparison:
        return Comparison(setting={}, num_samples=8, batch_size=2, n_batches=4, confidence=0.95,
                          baseline_seconds_per_image=2.0, baseline_batch_seconds=[2.0] * 4,
                          batches_evaluated=2, batch_seconds=[seconds, seconds * 1.001],
                          inference_seconds=2 * (seconds + seconds * 1.001),
                          psnr=[40.0] * 4, clip_scores=[1.0] * 4, baseline_clip_scores=[1.0] * 4)

    def rule(margin: float) -> EarlyStop:
        return EarlyStop("psnr", 1, speedup_after=2, quality_limit=30.0, stop_margin=margin,
                         speedup_to_beat=SpeedupInterval(2.0, 1.98, 2.02),
                         best_batch_seconds=best_seconds)

    assert rule(0.0)(partial(1.03)) == "dominated"  # without a margin a near-tie is stopped
    assert rule(0.05)(partial(1.03)) is None
    assert rule(0.05)(partial(1.2)) == "dominated"


def test_the_best_is_lowered_for_being_the_largest_of_many_trials():
    """The best is the maximum of the k feasible trials it was picked from: the dominated look
    lowers its figure by its standard error x the expected maximum of k normals, so a trial a
    little slower than a lucky best among many runs on, while one clearly slower still stops."""
    def partial(speedup: float) -> Comparison:
        seconds = 2.0 / speedup
        return Comparison(setting={}, num_samples=8, batch_size=2, n_batches=4, confidence=0.95,
                          baseline_seconds_per_image=2.0, baseline_batch_seconds=[2.0, 2.004, 1.996, 2.0],
                          batches_evaluated=2, batch_seconds=[seconds, seconds * 1.002],
                          inference_seconds=2 * (seconds + seconds * 1.002),
                          psnr=[40.0] * 4, clip_scores=[1.0] * 4, baseline_clip_scores=[1.0] * 4)

    def rule(k: int) -> EarlyStop:
        return EarlyStop("psnr", 1, speedup_after=2, quality_limit=30.0, stop_margin=0.05,
                         speedup_to_beat=SpeedupInterval(2.0, 1.8, 2.2), best_selected_from=k)

    assert selected_maximum_shift(1) == 0.0 and 1.5 < selected_maximum_shift(10) < 1.6
    assert rule(1)(partial(1.6)) == "dominated"  # one trial: its figure is taken as it is
    assert rule(20)(partial(1.6)) is None  # the best of 20 at par reads ~10 % high
    assert rule(20)(partial(1.2)) == "dominated"


def test_the_early_stop_evidence_comes_from_the_latest_trials_only():
    """Prompt effects and the first-batch record are learned from the latest RECENT_TRIALS trials:
    the rule's cost no longer grows with the study. Older trials that read otherwise are left out."""
    from optuna.trial import TrialState, create_trial

    from optsearch.optimize.early_stop import rule_for
    from optsearch.optimize.evidence import RECENT_TRIALS
    from optsearch.study_spec import spec_from_dict

    spec = spec_from_dict({"name": "s", "model": {"id": "builtin:tiny"},
                           "prompts": {"source": "builtin", "num_samples": 3, "batch_size": 1},
                           "quality": {"metric": "psnr", "limit": 30.0},
                           "search": {"accelerators": ["deepcache"]}})

    def trial(per_prompt, first_batch):
        return create_trial(state=TrialState.COMPLETE, value=1.0, user_attrs={
            "psnr_per_prompt": per_prompt, "fingerprint": "f", "batch_seconds": [first_batch, 1.0, 1.0],
            "warmup_seconds": 1.0})

    old = [trial([50.0, 30.0, 40.0], 2.0) for _ in range(50)]
    recent = [trial([40.0, 40.0, 40.0], 1.0) for _ in range(RECENT_TRIALS)]
    rule = rule_for(spec, old + recent, "f")
    assert np.allclose(rule.prompt_effects.effects, 0.0)
    assert len(rule.first_batches.after_warmup) == RECENT_TRIALS
    assert np.allclose(rule.first_batches.after_warmup, 0.0)
