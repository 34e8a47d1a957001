"""Benchmark 3b: replay samplers on the recorded grid landscape (benchmarks/data/).

Each sampler (TPE with constraints, GP, random, the exhaustive grid) searches the recorded
DeepCache+ToMe+T-GATE landscape of builtin:cpu-bench through optsearch's own search space and
sampler construction; the objective looks the grid point up. For 10 sampler seeds: the number of
trials needed to reach 98 % of the best feasible speedup. Target: 15 % of the grid or fewer.
"""

from __future__ import annotations

import json
import statistics
import sys

import optuna
from _common import ROOT, table

from optsearch.spec import spec_from_dict
from optsearch.study import constraints, make_sampler, suggest_setting

LANDSCAPE = ROOT / "benchmarks" / "data" / "landscape-cpu-bench.json"
optuna.logging.set_verbosity(optuna.logging.ERROR)


def flat(setting: dict) -> tuple:
    return tuple(sorted((f"{a}.{p}", v) for a, params in setting.items() for p, v in params.items()
                        if p in ("cache_interval", "cache_branch_id", "ratio", "gate_step")))


def spec_for(sampler: str, seed: int, limit: float, n_startup: int):
    return spec_from_dict({
        "name": "replay",
        "model": {"id": "builtin:cpu-bench", "steps": 20},
        "quality": {"metric": "psnr", "limit": limit},
        "search": {"accelerators": ["deepcache", "tome", "tgate"], "sampler": sampler,
                   "seed": seed, "n_startup_trials": n_startup},
        "space": {"deepcache": {"cache_interval": [2, 6], "cache_branch_id": [0, 2]},
                  "tome": {"ratio": [0.1, 0.7, 0.2], "max_downsample": 1},
                  "tgate": {"gate_step": [4, 16, 4]}},
    })


def trials_to_reach(spec, table_: dict, goal: float, cap: int) -> int | None:
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
    for number in range(1, cap + 1):
        trial = study.ask()
        point = table_[flat(suggest_setting(trial, spec))]
        summary = {"speedup": point["speedup"], "psnr": {"mean": point["psnr"]}}
        for key, value in constraints(spec, summary).items():
            trial.set_constraint(key, value)
        study.tell(trial, point["speedup"])
        if point["psnr"] >= spec.quality.limit and point["speedup"] >= goal:
            return number
    return None


def main(limit: float | None = None, n_startup: int = 10) -> None:
    data = json.loads(LANDSCAPE.read_text())
    points = data["points"]
    table_ = {tuple(sorted(p["params"].items())): p for p in points}
    limit = limit if limit is not None else statistics.median(p["psnr"] for p in points)
    feasible = [p for p in points if p["psnr"] >= limit]
    best = max(p["speedup"] for p in feasible)
    goal = 0.98 * best
    print(f"# search efficiency on the recorded landscape ({len(points)} points, {data['machine']})")
    print(f"PSNR limit {limit:.2f} dB: {len(feasible)} feasible points; best feasible speedup "
          f"{best:.2f}, goal {goal:.2f} (98 %); points reaching it: "
          f"{sum(p['speedup'] >= goal for p in feasible)}")
    rows = []
    for sampler, cap in (("tpe", len(points)), ("gp", 120), ("random", len(points)),
                         ("grid", len(points))):
        needed = [trials_to_reach(spec_for(sampler, seed, limit, n_startup), table_, goal, cap)
                  for seed in range(10)]
        reached = sorted(n for n in needed if n is not None)
        median = statistics.median(n if n is not None else cap + 1 for n in needed)
        rows.append([sampler, f"{median:.0f}", f"{100 * median / len(points):.1f} %",
                     f"{reached[0] if reached else '-'}..{reached[-1] if reached else '-'}",
                     f"{len(reached)}/10"])
        print(f"{sampler}: {needed}", flush=True)
    print(table(["sampler", "median trials", "share of grid", "min..max", "reached"], rows))


if __name__ == "__main__":
    arguments = sys.argv[1:]
    main(float(arguments[0]) if arguments else None, int(arguments[1]) if len(arguments) > 1 else 10)
