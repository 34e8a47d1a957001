"""(records) The DeepCache+ToMe+T-GATE grid of builtin:cpu-bench, batch by batch.

Like landscape.py, but every grid point keeps what a replay of early stopping needs: the warm-up
seconds, each timed batch's seconds, and each prompt's PSNR. 128 px, 20 steps, 3 prompts in 3
batches of 1 (the fewest batches with which early stop can act: it looks after min_batches = 2,
before the last); the baseline is re-timed every 40 points (CPU speed drifts) and each point's
speedup is against the latest one. Writes benchmarks/data/landscape-cpu-bench-batches.json
(about 15 minutes here; 6 prompts in batches of 2 would take over an hour).

    python -m benchmarks landscape-batches --num-samples 3 --batch-size 1

Other sizes write landscape-cpu-bench-batches-<prompts>x<batch_size>.json: 8 prompts in batches of
1 give a trial the 8 looks of a default study (32 prompts in batches of 4) in about 20 minutes, 16
in batches of 2 (two prompts a look) in about 27.

`--combo deepcache+tome` records the grid of a combo within it (its families' parameters, the
others off) to landscape-...-deepcache+tome.json: with the sub-combos the replays have the
conditional space of a study of `sd15-any`'s four combos (search_efficiency.py `--conditional`).

`--recording 2` records the same grid again, independently (its own process, baselines and noise),
to landscape-...-2.json: a replay that does not grade itself defines the answer on one recording
and searches the other (search_cost.py, RESULTS "Search cost").
"""

from __future__ import annotations

import itertools
import json
import time

from benchmarks.common import ROOT, machine
from benchmarks.replay import GRID, REBASELINE_EVERY, landscape_path
from optsearch import load_spec
from optsearch.measure.evaluate import evaluator_from_spec


def main(num_samples: int = 3, batch_size: int = 1, recording: int = 1, combo: str = "") -> None:
    spec = load_spec(ROOT / "studies" / "cpu-bench.toml")
    spec.model.height = spec.model.width = 128
    spec.prompts.num_samples, spec.prompts.batch_size = num_samples, batch_size
    evaluator = evaluator_from_spec(spec)
    baseline = evaluator.baseline()
    baselines = [{"seconds_per_image": baseline.seconds_per_image,
                  "batch_seconds": baseline.batch_seconds}]
    points, started = [], time.perf_counter()
    grid = {name: values for name, values in GRID.items()
            if not combo or name.split(".")[0] in combo.split("+")}
    combos = list(itertools.product(*grid.values()))
    for index, values in enumerate(combos):
        if index and index % REBASELINE_EVERY == 0:
            timed = evaluator.baseline(scored=baseline)
            baselines.append({"seconds_per_image": timed.seconds_per_image,
                              "batch_seconds": timed.batch_seconds})
        setting = dict(zip(grid, values, strict=True))
        evaluator.warm.clear()  # record every point's short warm-up: a fresh worker's first trial
        result = evaluator.compare(setting, baseline)
        current = baselines[-1]
        points.append({
            "params": setting, "seconds_per_image": result.seconds_per_image,
            "speedup": current["seconds_per_image"] / result.seconds_per_image,
            "baseline": len(baselines) - 1, "warmup_seconds": result.warmup_seconds,
            "batch_seconds": result.batch_seconds, "psnr_per_prompt": result.psnr,
            "psnr": result.interval("psnr").mean, "ssim": result.interval("ssim").mean,
        })
        print(f"{index + 1}/{len(combos)} {setting} {result.seconds_per_image:.3f} s/img "
              f"psnr {points[-1]['psnr']:.1f}", flush=True)
    out = landscape_path(num_samples, batch_size, recording, combo)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": machine(), "model": "builtin:cpu-bench", "height": 128, "steps": spec.model.steps,
        "prompts": num_samples, "batch_size": batch_size, "grid": grid, "baselines": baselines,
        "seconds": time.perf_counter() - started, "points": points,
    }, indent=1))
    print(f"wrote {out} ({len(points)} points, {time.perf_counter() - started:.0f} s)")

