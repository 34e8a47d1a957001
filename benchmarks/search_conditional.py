"""TPE on a conditional space: the four combos of `sd15-any` (DeepCache alone, + ToMe, + T-GATE,
+ both) over the recorded cpu-bench grids, with optsearch's sampler as shipped (Optuna's TPE,
multivariate) and with `group=True` (Optuna's decomposition of a conditional space into groups of
parameters drawn together). Without it, TPE models jointly only what every trial has (the combo)
and draws each family's parameters one by one.

A replay that does not grade itself: the search sees one recording of the grids (3 prompts),
the answer is defined on the other (each setting's speedup and PSNR there). For 10 seeds, the
distinct settings measured until one is, on the answer's recording, feasible and within 2 % of
the best feasible speedup (`--goals 0.98,0.95` adds 5 %); 375 settings in all. About 12 minutes a
direction here (TPE's asks grow with the trials, up to 4,000 a seed).

    python -m benchmarks landscape-batches --combo deepcache [--recording 2]   # and +tome, +tgate
    python -m benchmarks search-conditional
"""

from __future__ import annotations

import json
import statistics

import optuna

from benchmarks.common import table
from benchmarks.replay import landscape_path, limit_in_a_gap, tell_point
from optsearch.accelerators import combo_name
from optsearch.optimize.samplers import TrialSeeded
from optsearch.optimize.space import suggest_setting
from optsearch.study_spec import spec_from_dict

COMBOS = ("deepcache", "deepcache+tome", "deepcache+tgate", "deepcache+tome+tgate")
NAMES = ("cache_interval", "cache_branch_id", "ratio", "gate_step")
optuna.logging.set_verbosity(optuna.logging.ERROR)


def key_of(combo: str, params: dict) -> tuple:
    return combo, tuple(sorted((f"{family}.{name}", round(float(value), 6))
                               for family, values in params.items() for name, value in values.items()
                               if name in NAMES))


def recorded(recording: int) -> dict[tuple, dict]:
    """(combo, params) -> the recorded point, over the four combos' grids."""
    points = {}
    for combo in COMBOS:
        for point in json.loads(landscape_path(3, 1, recording, combo).read_text())["points"]:
            nested: dict[str, dict] = {}
            for name, value in point["params"].items():
                family, param = name.split(".")
                nested.setdefault(family, {})[param] = value
            points[key_of(combo, nested)] = point
    return points


def spec_for(seed: int, limit: float):
    return spec_from_dict({
        "name": "conditional", "model": {"id": "builtin:cpu-bench", "steps": 20},
        "quality": {"metric": "psnr", "limit": limit},
        "search": {"accelerators": [c.split("+") for c in COMBOS], "sampler": "tpe", "seed": seed},
        "space": {"deepcache": {"cache_interval": [2, 6], "cache_branch_id": [0, 2]},
                  "tome": {"ratio": [0.1, 0.7, 0.2], "max_downsample": 1},
                  "tgate": {"gate_step": [4, 16, 4]}},
    })


def settings_to_reach(spec, sampler, searched: dict, truth: dict, limit: float, goal: float,
                      cap: int = 375, asks: int = 4000) -> int | None:
    """Distinct settings measured until one is feasible and reaches `goal` on the answer's
    recording; None past `cap`. A repeat is free (a study copies its result)."""
    study = optuna.create_study(direction="maximize", sampler=sampler)
    measured: set[tuple] = set()
    for _ in range(asks):
        trial = study.ask()
        setting = suggest_setting(trial, spec)
        key = key_of(combo_name(setting), setting)
        point = searched[key]
        if key not in measured:
            measured.add(key)
            if truth[key]["psnr"] >= limit and truth[key]["speedup"] >= goal:
                return len(measured)
            if len(measured) >= cap:
                return None
        tell_point(study, trial, spec, point)
    return None


SAMPLERS = {
    "TPE as shipped": lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=20),
    "TPE, group=True": lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=20,
                                                              multivariate=True, group=True),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}


def main(seeds: int = 10, goals: str = "0.98") -> None:
    recordings = [recorded(1), recorded(2)]
    rows = []
    for searched, answer in ((0, 1), (1, 0)):
        truth = recordings[answer]
        limit = limit_in_a_gap([p["psnr"] for p in truth.values()])
        best = max(p["speedup"] for p in truth.values() if p["psnr"] >= limit)
        print(f"search on recording {searched + 1}, answer on {answer + 1}: {len(truth)} settings, "
              f"PSNR limit {limit:.2f} dB, best feasible speedup {best:.2f}", flush=True)
        for fraction in (float(goal) for goal in goals.split(",")):
            for name, build in SAMPLERS.items():
                needed = [settings_to_reach(spec_for(seed, limit), TrialSeeded(build, seed),
                                            recordings[searched], truth, limit, fraction * best)
                          for seed in range(seeds)]
                reached = sorted(n for n in needed if n is not None)
                median = statistics.median(n if n is not None else 376 for n in needed)
                rows.append([f"{searched + 1} -> {answer + 1}", f"{fraction:.0%}", name, f"{median:.0f}",
                             f"{reached[0]}..{reached[-1]}" if reached else "-", f"{len(reached)}/{seeds}"])
                print(rows[-1], needed, flush=True)
    print(table(["recordings", "goal", "sampler", "median settings", "min..max", "reached"], rows))
