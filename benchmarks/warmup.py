"""Does the short warm-up time as correctly as a full warm-up batch?

builtin:cpu-bench at 128 px, 20 steps, 6 prompts in batches of 2. For the baseline and each
accelerator alone and combined, the full warm-up (a whole first batch, as before) and the short one
(the first batch's shape for just enough steps: evaluate.warmup_steps) alternate, R rounds each,
in one process; the timed seconds per image after each are compared, with the warm-up's own cost.
A third mode, "none (warm)", first runs a sibling setting of the same combo (other parameters:
other token counts for ToMe, other cached steps) and then times the setting with no warm-up at
all: what a worker does for every trial after its first of a combo at a batch shape.
"""

from __future__ import annotations

import statistics

from benchmarks.common import machine, table
from optsearch.accelerators import AppliedSetting
from optsearch.measure.evaluate import Evaluator
from optsearch.measure.generation import GenerationConfig, warmup_steps
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import load_prompts
from optsearch.measure.quality import ClipScorer

SIBLINGS = {
    "baseline": {},
    "DeepCache 3/0": {"deepcache": {"cache_interval": 5, "cache_branch_id": 0}},
    "ToMe 0.5": {"tome": {"ratio": 0.3}},
    "T-GATE 10": {"tgate": {"gate_step": 6}},
    "all three": {"deepcache": {"cache_interval": 5, "cache_branch_id": 0}, "tome": {"ratio": 0.3},
                  "tgate": {"gate_step": 6}},
}
SETTINGS = {
    "baseline": {},
    "DeepCache 3/0": {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}},
    "ToMe 0.5": {"tome": {"ratio": 0.5}},
    "T-GATE 10": {"tgate": {"gate_step": 10}},
    "all three": {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}, "tome": {"ratio": 0.5},
                  "tgate": {"gate_step": 10}},
}


def timed(evaluator: Evaluator, setting: dict, reference) -> tuple[float, float]:
    """(seconds per image, warm-up seconds) of one pass."""
    if not setting:
        baseline = evaluator.baseline()
        return baseline.seconds_per_image, float("nan")
    result = evaluator.compare(setting, reference)
    return result.seconds_per_image, result.warmup_seconds


def main(rounds: int = 3) -> None:
    pipe = load_pipeline("builtin:cpu-bench", device="cpu", dtype="float32")
    config = GenerationConfig(steps=20, height=128, width=128, guidance_scale=7.5, batch_size=2)
    evaluator = Evaluator(pipe, ClipScorer("builtin:tiny", "none"), load_prompts("builtin", 6), config)
    reference = evaluator.baseline()
    rows = []
    modes = (("full", config.steps), ("short", True), ("none (warm)", False))
    for name, setting in SETTINGS.items():
        runs = {mode: [] for mode, _ in modes}
        warm = {mode: [] for mode, _ in modes}
        for _ in range(rounds):
            for mode, warmup in modes:
                if warmup is False:  # the process has just run the combo with other parameters
                    evaluator = evaluator.derive(warmup=True)
                    timed(evaluator, SIBLINGS[name], reference)
                evaluator = evaluator.derive(warmup=warmup)
                evaluator.warm.clear()  # "full" and "short" warm up even in a warm process
                seconds, warmup_seconds = timed(evaluator, setting, reference)
                runs[mode].append(seconds)
                warm[mode].append(warmup_seconds)
        with AppliedSetting(pipe, setting) as applied:
            steps = warmup_steps(config, applied)
        full, short, none = (statistics.mean(runs[mode]) for mode, _ in modes)
        rows.append([name, steps, full, short, f"{100 * (short / full - 1):+.1f} %", none,
                     f"{100 * (none / full - 1):+.1f} %",
                     statistics.mean(warm["full"]) if setting else "-",
                     statistics.mean(warm["short"]) if setting else "-"])
        print(name, runs, flush=True)
    print(f"# short vs full warm-up, builtin:cpu-bench 128 px, 20 steps, 6 prompts, batch 2, "
          f"{rounds} alternating rounds ({machine()})")
    print(table(["setting", "short warm-up steps", "s/img after full", "s/img after short",
                 "difference", "s/img, none (warm)", "difference", "full warm-up s",
                 "short warm-up s"], rows))

