"""Record, once, the full grid landscape of DeepCache+ToMe+T-GATE on builtin:cpu-bench.

Every grid point is measured like a trial (warm-up, timed batches, PSNR vs the baseline) and saved
with its speedup to benchmarks/data/landscape-cpu-bench.json, which search_efficiency.py replays.
128 px and 2 prompts keep the 240 points affordable on 2 CPU cores (about 15 minutes).
"""

from __future__ import annotations

import itertools
import json
import time

from benchmarks.common import ROOT, machine
from benchmarks.replay import GRID, REBASELINE_EVERY
from optsearch import load_spec
from optsearch.measure.evaluate import evaluator_from_spec

OUT = ROOT / "benchmarks" / "data" / "landscape-cpu-bench.json"


def main() -> None:
    spec = load_spec(ROOT / "studies" / "cpu-bench.toml")
    spec.model.height = spec.model.width = 128
    spec.prompts.num_samples, spec.prompts.batch_size = 2, 2
    evaluator = evaluator_from_spec(spec)
    baseline = evaluator.baseline()
    baseline_times = [baseline.seconds_per_image]
    points, started = [], time.perf_counter()
    names = list(GRID)
    for index, values in enumerate(itertools.product(*GRID.values())):
        if index and index % REBASELINE_EVERY == 0:
            baseline_times.append(evaluator.baseline().seconds_per_image)
        setting = dict(zip(names, values, strict=True))
        result = evaluator.compare(setting, baseline)
        points.append({"params": setting, "seconds_per_image": result.seconds_per_image,
                       "psnr": result.interval("psnr").mean, "ssim": result.interval("ssim").mean})
        print(f"{index + 1}/{len(list(itertools.product(*GRID.values())))} {setting} "
              f"{result.seconds_per_image:.3f} s/img psnr {points[-1]['psnr']:.1f}", flush=True)
    baseline_seconds = sum(baseline_times) / len(baseline_times)
    for point in points:
        point["speedup"] = baseline_seconds / point["seconds_per_image"]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({
        "machine": machine(), "model": "builtin:cpu-bench", "height": 128, "steps": spec.model.steps,
        "prompts": 2, "grid": GRID, "baseline_seconds_per_image": baseline_seconds,
        "baseline_times": baseline_times, "seconds": time.perf_counter() - started, "points": points,
    }, indent=1))
    print(f"wrote {OUT} ({len(points)} points, {time.perf_counter() - started:.0f} s)")

