"""What a sampler's repeats cost a study with a trial budget, and what measuring an unmeasured
setting after each repeat gives back.

TPE (optsearch's sampler, constrained) searches the recorded DeepCache+ToMe+T-GATE grid of
cpu-bench (240 settings), and two smaller spaces within it (60 and 15 settings: small spaces are
where samplers repeat themselves), through optsearch's own space and sampler, for 10 seeds and
several `n_trials`, two ways:
- "repeats counted" (before): every trial counts, a repeat copies its result;
- "repeats free" (now): a repeat copies its result for free and takes no trial; the next trial
  measures a setting not tried yet, drawn at random (`sharing.unmeasured_params`, as a worker does).
The search sees one recording (8 prompts); its winner (the best feasible there) is graded on
another, independent recording of the same grid (`replay.Landscape`'s answer): its speedup there
against that recording's best feasible one, and whether it is feasible there at all.
"""

from __future__ import annotations

import json
import statistics

import optuna

from benchmarks.common import table
from benchmarks.replay import Landscape, landscape_path, tell_point
from benchmarks.search_efficiency import flat
from optsearch.optimize.samplers import make_sampler
from optsearch.optimize.sharing import unmeasured_params
from optsearch.optimize.space import suggest_setting
from optsearch.study_spec import StudySpec, spec_from_dict

optuna.logging.set_verbosity(optuna.logging.ERROR)


GRID_SPACE = {"deepcache": {"cache_interval": [2, 6], "cache_branch_id": [0, 2]},
              "tome": {"ratio": [0.1, 0.7, 0.2], "max_downsample": 1},
              "tgate": {"gate_step": [4, 16, 4]}}
SPACES = {  # name -> (what it fixes, its budgets)
    "240 (the grid)": ({}, (15, 30, 60)),
    "60 (gate_step 16)": ({"tgate": {"gate_step": 16}}, (15, 30, 45)),
    "15 (ratio 0.5, gate_step 16)": ({"tome": {"ratio": 0.5}, "tgate": {"gate_step": 16}}, (8, 12)),
}


def spec_for(seed: int, limit: float, fixed: dict) -> StudySpec:
    space = {family: {**params, **fixed.get(family, {})} for family, params in GRID_SPACE.items()}
    return spec_from_dict({
        "name": "repeats", "model": {"id": "builtin:cpu-bench", "steps": 20},
        "quality": {"metric": "psnr", "limit": limit},
        "search": {"accelerators": ["deepcache", "tome", "tgate"], "sampler": "tpe", "seed": seed},
        "space": space})  # TPE with the spec's default start-up (20 trials)


def search(spec, landscape: Landscape, n_trials: int, free: bool) -> dict[tuple, dict]:
    """The settings one study measures (key -> the search recording's point)."""
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
    measured: dict[tuple, dict] = {}
    trials = repeated = 0
    while (len(measured) if free else trials) < n_trials:
        if repeated:
            params = unmeasured_params({str(key) for key in measured},
                                       lambda t: suggest_setting(t, spec),
                                       lambda setting, _used: str(flat(setting)), seed=trials)
            if params is None:
                break
            study.enqueue_trial(params)
        trial = study.ask()
        key = flat(suggest_setting(trial, spec))
        point = landscape.points[key]
        repeated = free and key in measured
        measured[key] = point
        trials += 1
        tell_point(study, trial, spec, point)
    return measured


def grade(landscape: Landscape, measured: dict[tuple, dict]) -> tuple[float, bool]:
    """The winner's speedup on the answer's recording over its best feasible one, and whether the
    winner is feasible there (0, False: nothing feasible found)."""
    feasible = [p for p in measured.values() if p["psnr"] >= landscape.limit]
    if not feasible:
        return 0.0, False
    winner = max(feasible, key=lambda p: p["speedup"])
    truth = landscape.truth[flat_key(winner)]
    return truth["speedup"] / landscape.best, truth["psnr"] >= landscape.limit


def flat_key(point: dict) -> tuple:
    return tuple(sorted((k, round(v, 6)) for k, v in point["params"].items()
                        if k.split(".")[1] in ("cache_interval", "cache_branch_id", "ratio", "gate_step")))


def main(seeds: int = 10) -> None:
    recordings = [json.loads(landscape_path(8, 1, r).read_text()) for r in (1, 2)]
    print("# repeats: a trial budget with repeats counted (before) or free (now), TPE on the "
          "cpu-bench grid and two spaces within it, searched on one recording, graded on the other")
    rows = []
    for searched, answer in ((0, 1), (1, 0)):
        for space, (fixed, budgets) in SPACES.items():
            points, truth = ([p for p in recordings[r]["points"] if _within(p, fixed)]
                             for r in (searched, answer))
            landscape = Landscape({**recordings[searched], "points": points}, None,
                                  {**recordings[answer], "points": truth})
            print(f"{space}, search on recording {searched + 1}, answer on {answer + 1}: PSNR limit "
                  f"{landscape.limit:.2f} dB, best feasible speedup {landscape.best:.2f}", flush=True)
            for n_trials in budgets:
                for free in (False, True):
                    found = [search(spec_for(seed, landscape.limit, fixed), landscape, n_trials, free)
                             for seed in range(seeds)]
                    grades = [grade(landscape, measured) for measured in found]
                    shares = [share for share, _ in grades]
                    rows.append([space, f"{searched + 1} -> {answer + 1}", n_trials,
                                 "free (now)" if free else "counted (before)",
                                 f"{statistics.median(len(m) for m in found):.0f}",
                                 f"{min(len(m) for m in found)}..{max(len(m) for m in found)}",
                                 f"{100 * statistics.median(shares):.1f} %",
                                 f"{100 * min(shares):.1f} %",
                                 f"{sum(share >= 0.98 and ok for share, ok in grades)}/{seeds}",
                                 f"{sum(not ok for _, ok in grades)}/{seeds}"])
                    print(rows[-1], flush=True)
    print(table(["space", "recordings", "n_trials", "repeats", "distinct (median)", "min..max",
                 "winner/best (median)", "worst", "within 2 % and feasible", "infeasible winner"],
                rows))


def _within(point: dict, fixed: dict) -> bool:
    """Is the recorded point in the space that fixes `fixed`?"""
    return all(abs(point["params"][f"{family}.{param}"] - value) < 1e-9
               for family, params in fixed.items() for param, value in params.items())
