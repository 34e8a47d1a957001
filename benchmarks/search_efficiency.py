"""Replay samplers on the recorded grid landscape (benchmarks/data/).

Each sampler (TPE with constraints, GP, random, the exhaustive grid) searches the recorded
DeepCache+ToMe+T-GATE landscape of builtin:cpu-bench through optsearch's own search space and
sampler construction; the objective looks the grid point up. For 10 sampler seeds: the number of
distinct settings measured before one reaches 98 % (and 95 %) of the best feasible speedup. A
repeated setting is not counted: a study reuses its stored result instead of measuring it again.
Target: 15 % of the grid or fewer.
"""

from __future__ import annotations

import json
import statistics

import optuna

from benchmarks.common import ROOT, table
from benchmarks.replay import tell_point
from optsearch.optimize.samplers import make_sampler
from optsearch.optimize.space import suggest_setting
from optsearch.study_spec import spec_from_dict

LANDSCAPE = ROOT / "benchmarks" / "data" / "landscape-cpu-bench.json"
optuna.logging.set_verbosity(optuna.logging.ERROR)


def flat(setting: dict) -> tuple:
    return tuple(sorted((f"{a}.{p}", round(v, 6)) for a, params in setting.items()
                        for p, v in params.items()
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


def trials_to_reach(spec, table_: dict, goal: float, cap: int, asks: int = 3000) -> int | None:
    """Distinct settings measured until a feasible one reaches `goal`; None past `cap`."""
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
    measured: set[tuple] = set()
    for _ in range(asks):
        trial = study.ask()
        key = flat(suggest_setting(trial, spec))
        point = table_[key]
        if key not in measured:
            measured.add(key)
            if point["psnr"] >= spec.quality.limit and point["speedup"] >= goal:
                return len(measured)
            if len(measured) >= cap:
                return None
        tell_point(study, trial, spec, point)
    return None


SAMPLERS = (("tpe", 10), ("tpe", 20), ("gp", 20), ("random", 0), ("grid", 0))


def main(limit: float | None = None) -> None:
    data = json.loads(LANDSCAPE.read_text())
    points = data["points"]
    table_ = {tuple(sorted((k, round(v, 6)) for k, v in p["params"].items())): p for p in points}
    limit = limit if limit is not None else statistics.median(p["psnr"] for p in points)
    feasible = [p for p in points if p["psnr"] >= limit]
    best = max(p["speedup"] for p in feasible)
    print(f"# search efficiency on the recorded landscape ({len(points)} points, {data['machine']})")
    print(f"PSNR limit {limit:.2f} dB: {len(feasible)} feasible points; best feasible speedup {best:.2f}")
    rows = []
    for fraction in (0.98, 0.95):
        goal = fraction * best
        reaching = sum(p["speedup"] >= goal for p in feasible)
        for sampler, n_startup in SAMPLERS:
            cap = 120 if sampler == "gp" else len(points)  # GP fitting slows down with trials
            spec_seeds = [spec_for(sampler, seed, limit, n_startup or 10) for seed in range(10)]
            needed = [trials_to_reach(spec, table_, goal, cap) for spec in spec_seeds]
            reached = sorted(n for n in needed if n is not None)
            median = statistics.median(n if n is not None else cap + 1 for n in needed)
            name = f"{sampler} (startup {n_startup})" if n_startup else sampler
            rows.append([f"{fraction:.0%} ({reaching} pts)", name, f"{median:.0f}",
                         f"{100 * median / len(points):.1f} %",
                         f"{reached[0]}..{reached[-1]}" if reached else "-", f"{len(reached)}/10"])
            print(f"{fraction:.0%} {name}: {needed}", flush=True)
    print(table(["goal", "sampler", "median settings", "share of grid", "min..max", "reached"], rows))

