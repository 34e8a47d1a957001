"""Device-seconds to the answer, replayed on the batch-by-batch landscape.

Replays studies over benchmarks/data/landscape-cpu-bench-batches.json (recorded by
landscape_batches.py: warm-up, per-batch seconds and per-prompt PSNR of every grid point), with
optsearch's own space, sampler, warm-start and early-stop code. A trial costs its warm-up plus the
batches it runs; a setting measured before costs nothing (the study reuses it). For each
configuration and N sampler seeds: device-seconds (and trials) until a completed feasible trial
reaches 98 % of the grid's best feasible speedup; and, with 1/2/4/8 simulated asynchronous workers
(TPE's constant liar, as real workers run), the wall time to the same goal.

Configurations:
- today:    the rules when the issue was filed: quality early stop only (a two-sided interval of
            the prompts' mean), a full warm-up batch per trial, no warm start;
- speedup:  early stop as it is now: speedup-aware ("dominated", with the pooled timing noise)
            and the sharper quality look (one-sided); pruned, with the partial speedup reported;
- speedup (complete): the same, but stopped trials are told as COMPLETE with their partial figures;
- warm:     today + published warm start;
- new, short warm-up every trial: early stop + warm start + the short warm-up before every trial;
- new, no prompt effects: the same, but no warm-up once the worker ran the combo;
- new:      what a study does now: the same, and the quality look removes the prompts' effects
            measured on earlier trials (from the 5th trial that ran on all prompts); the looks
            share alpha on their correlation (sequential); a trial timed against the same
            recorded baseline as the best is compared with the best's own batch seconds;
            the first speedup look comes after the 1st batch once 5 earlier trials (of the same
            kind: warmed up or not) record how far first batches read from the rest;
- new, Bonferroni looks / no same-baseline seconds / no first-batch look: "new" without one of
  those;
- new with 10 or 5 start-up trials (random trials before TPE models the space), with and
  without the warm start.

    python -m benchmarks search-cost --limit L --seeds N --parallel 0   # 0 skips the workers table
    REPLAY_ONLY="new;new, GP sampler" python -m benchmarks search-cost ...   # only those (+ today)
    LANDSCAPE=8x1 python -m benchmarks search-cost ...   # the 8-prompt landscape (8 looks a trial)
    LANDSCAPE=16x2 python -m benchmarks search-cost --limit 35.13 ...   # 16 prompts in batches of 2
    LANDSCAPE=8x1 python -m benchmarks search-cost --search 2 --answer 1   # does not grade itself

A replay that grades itself (`--answer 0`, the earlier figures) finds the best and each point's
speedup in the very noise it replays. With `--answer 1 --search 2` the best, the answers (>= 98 %
of it) and the limit come from one recording and the search replays the other, independent one
(landscape_batches.py --recording 2); the limit sits in the middle of a gap between points'
PSNR (`limit_in_a_gap`), not on the answer's figure.

The GP configuration runs only on request: GP fits a model at every ask, and 10 seeds did not
finish in 25 minutes on 2 cores.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import multiprocessing
import os
import statistics
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from benchmarks.common import table
from benchmarks.replay import IssueTimeQualityStop, Landscape, key_of, landscape_path, measure
from optsearch.measure.metrics import Interval
from optsearch.measure.speedup import speedup_interval
from optsearch.optimize.early_stop import EarlyStop, rule_for
from optsearch.optimize.objectives import constraints
from optsearch.optimize.samplers import make_sampler
from optsearch.optimize.space import suggest_setting
from optsearch.optimize.warm_start import warm_start_params
from optsearch.storage.record import interval_attrs
from optsearch.study_spec import spec_from_dict

FINGERPRINT = "replay"  # every replayed trial ran on one device
SIZE = tuple(int(n) for n in os.environ.get("LANDSCAPE", "3x1").split("x"))
optuna.logging.set_verbosity(optuna.logging.ERROR)


@dataclass(frozen=True)
class Config:
    name: str
    speedup_stop: bool = False
    warm_start: bool = False
    short_warmup: bool = False
    warm_process: bool = False  # no warm-up once the worker ran the combo (each worker's 1st trial)
    tell_complete: bool = False
    prompt_effects: bool = False  # the quality look removes prompt effects of earlier trials
    speedup_after: int = 1  # EarlyStop.speedup_after (2: no first-batch look)
    startup: int = 20  # n_startup_trials (random trials before TPE models the space)
    sampler: str = "tpe"
    boundary: str = "pocock"  # EarlyStop.boundary: the looks' per-look alpha
    same_baseline: bool = True  # compare with the best's seconds when both share a baseline timing
    on_request: bool = False  # only when named in REPLAY_ONLY (GP: > 25 min for 10 seeds here)
    stop_margin: float | None = None  # the dominated look's margin (None: the spec's default)
    selected_maximum: bool = True  # the best lowered for being the largest of k trials


NEW = {"speedup_stop": True, "warm_start": True, "short_warmup": True, "warm_process": True,
       "prompt_effects": True}
CONFIGS = (
    Config("today"),
    Config("speedup", speedup_stop=True),
    Config("speedup (complete)", speedup_stop=True, tell_complete=True),
    Config("warm", warm_start=True),
    Config("new, short warm-up every trial", speedup_stop=True, warm_start=True, short_warmup=True),
    Config("new, no prompt effects", **{**NEW, "prompt_effects": False}),
    Config("new", **NEW),
    Config("new, Bonferroni looks", **NEW, boundary="bonferroni"),
    Config("new, no same-baseline seconds", **NEW, same_baseline=False),
    Config("new, no first-batch look", **NEW, speedup_after=2),
    Config("new, told COMPLETE", **NEW, tell_complete=True),
    Config("new, 10 start-up", **NEW, startup=10),
    Config("new, 5 start-up", **NEW, startup=5),
    Config("new, no warm start", **{**NEW, "warm_start": False}),
    Config("new, no warm start, 10 start-up", **{**NEW, "warm_start": False}, startup=10),
    Config("new, GP sampler", **NEW, sampler="gp", on_request=True),
    Config("new, no margin, best as read", **NEW, stop_margin=0.0, selected_maximum=False,
           on_request=True),
    Config("new, best as read", **NEW, selected_maximum=False, on_request=True),
    Config("new, margin 2 %", **NEW, stop_margin=0.02, on_request=True),
    Config("new, margin 10 %", **NEW, stop_margin=0.10, on_request=True),
)


def spec_for(seed: int, land: Landscape, config: Config):
    """The replayed study's spec: the landscape's model, prompts and grid, this seed and config."""
    prompts = len(land.data["points"][0]["psnr_per_prompt"])
    return spec_from_dict({
        "name": "replay", "model": {"id": "builtin:cpu-bench", "steps": 20},
        "prompts": {"num_samples": prompts, "batch_size": land.batch_size},
        "quality": {"metric": "psnr", "limit": land.limit},
        "search": {"accelerators": ["deepcache", "tome", "tgate"], "seed": seed,
                   "n_startup_trials": config.startup, "sampler": config.sampler,
                   "warm_start": ["published"] if config.warm_start else []},
        "space": {"deepcache": {"cache_interval": [2, 6], "cache_branch_id": [0, 2]},
                  "tome": {"ratio": [0.1, 0.7, 0.2], "max_downsample": 1},
                  "tgate": {"gate_step": [4, 16, 4]}},
    })


GOAL = float(os.environ.get("GOAL", "0.98"))  # an answer: a feasible point this close to the best


def run(land: Landscape, config: Config, seed: int, workers: int = 1, cap: int = 3000) -> tuple:
    """(device seconds, wall seconds, trials, wrong stops) until the goal (None entries if never
    reached); wrong stops: (feasible settings stopped for quality, answers - feasible, >= 98 % of
    the best - stopped for speedup)."""
    spec = spec_for(seed, land, config)
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
    for params in warm_start_params(spec, storage=None):
        study.enqueue_trial(params)
    goal = GOAL * land.best
    finished: list[FrozenTrial] = []  # the study's records, as a worker reads them
    done: dict[tuple, tuple] = {}
    clock, device, trials, wrong = 0.0, 0.0, 0, np.zeros(2, dtype=int)
    running: list[tuple] = []  # (finish time, index, trial, point, batches, reason, record)
    free = workers

    def finish_next() -> tuple[float, bool]:
        """The next running trial finishes: its time, and whether it reached the goal."""
        finish, _, trial, point, batches, reason, warmed = heapq.heappop(running)
        feasible_done = tell(study, spec, trial, point, batches, reason, config, land, finished, warmed)
        return finish, feasible_done and land.true_speedup(point) >= goal

    for index in range(cap):
        while free == 0:
            (clock, reached), free = finish_next(), free + 1
            if reached:
                return device, clock, trials, wrong
        trial = study.ask()
        setting = suggest_setting(trial, spec)
        params = {f"{a}.{p}": v for a, values in setting.items() for p, v in values.items()}
        point = land.points[key_of(params)]
        key = key_of(params)
        if key in done and len(done) == len(land.points):
            break  # every setting measured: the goal was stopped early by mistake
        if key in done:  # reused: no device time
            batches, reason = done[key]
            heapq.heappush(running, (clock, index, trial, point, batches, reason, None))
            free -= 1
            continue
        warm = config.warm_process and trials >= workers  # every worker has run the combo
        rule = (replay_rule(spec, finished, point, config) if config.speedup_stop
                else IssueTimeQualityStop(land.limit))
        batches, reason = measure(land, point, rule, warmed_up=not warm)
        done[key] = (batches, reason)
        if reason and land.feasible(point):
            wrong += (reason == "quality", reason != "quality" and land.true_speedup(point) >= goal)
        seconds = land.cost(point, batches, config.short_warmup, warm)
        device += seconds
        trials += 1
        heapq.heappush(running, (clock + seconds, index, trial, point, batches, reason, not warm))
        free -= 1
    while running:  # every setting asked for: the trials still running finish
        clock, reached = finish_next()
        if reached:
            return device, clock, trials, wrong
    return None, None, None, wrong


def replay_rule(spec, finished: list[FrozenTrial], point: dict, config: Config) -> EarlyStop:
    """The worker's own rule (`rule_for`) over the replayed study, less what `config` turns off."""
    rule = rule_for(spec, finished, FINGERPRINT, baseline_id=point["baseline"])
    return dataclasses.replace(
        rule, speedup_after=config.speedup_after, boundary=config.boundary,
        stop_margin=rule.stop_margin if config.stop_margin is None else config.stop_margin,
        best_selected_from=rule.best_selected_from if config.selected_maximum else 1,
        prompt_effects=rule.prompt_effects if config.prompt_effects else None,
        best_batch_seconds=rule.best_batch_seconds if config.same_baseline else None)


def tell(study, spec, trial, point, batches, reason, config, land, finished, warmed) -> bool:
    """Tell the sampler and add the trial's record to `finished` (`warmed` None: a reused
    setting); True when a feasible trial completed with all its batches."""
    n = len(batches) * land.batch_size
    psnr = point["psnr_per_prompt"][:n]
    partial_speedup = float(np.mean(land.baseline(point))) / float(np.mean(batches))
    summary = {"speedup": partial_speedup, "psnr": {"mean": float(np.mean(psnr))}}
    values = constraints(spec, summary)
    for name, value in values.items():
        trial.set_constraint(name, value)
    if reason is None or config.tell_complete:
        study.tell(trial, partial_speedup)
    else:
        trial.report(partial_speedup, len(batches))
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    attrs = {"fingerprint": FINGERPRINT, "batch_seconds": list(batches), "psnr_per_prompt": psnr,
             "warmup_seconds": 1.0 if warmed else 0.0, "baseline_id": point["baseline"],
             "constraints": values}
    if warmed is None:
        attrs["reused_from"] = -1
    if reason is None:
        attrs.update(speedup_interval(land.baseline(point), batches, 0.95, partial_speedup).to_dict())
        # its quality interval, as a worker records it: the dominated look compares only with a
        # best feasible under the "bound" rule, read from these (without them it never fired)
        attrs.update(interval_attrs("psnr", Interval.of(psnr, 0.95)))
    finished.append(optuna.trial.create_trial(
        state=TrialState.COMPLETE if reason is None else TrialState.PRUNED,
        value=partial_speedup if reason is None else None, user_attrs=attrs))
    return reason is None and summary["psnr"]["mean"] >= land.limit


def replay(land: Landscape, config: Config, seeds: int, workers: int = 1) -> list[tuple]:
    """run() for seeds 0..seeds-1, on JOBS processes (default: every core; a replay times
    nothing, so the cores do not disturb it)."""
    jobs = int(os.environ.get("JOBS", os.cpu_count() or 1))
    if jobs == 1:
        return [run(land, config, seed, workers) for seed in range(seeds)]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.starmap(run, [(land, config, seed, workers) for seed in range(seeds)])


def ratio_with_interval(device: list[float], today: list[float], draws: int = 2000) -> str:
    """median(device) / median(today) with a bootstrap 95 % interval over the seeds: per-seed
    device-seconds spread 10-100x, so a median of 30 seeds is itself uncertain."""
    rng = np.random.default_rng(0)
    ratios = [np.median(rng.choice(device, len(device))) / np.median(rng.choice(today, len(today)))
              for _ in range(draws)]
    low, high = np.percentile(ratios, [2.5, 97.5])
    return f"{statistics.median(device) / statistics.median(today):.2f} [{low:.2f}, {high:.2f}]"


def per_seed_ratio(device: list, today: list, draws: int = 2000) -> str:
    """The median over seeds of device / today for the same sampler seed, with a bootstrap 95 %
    interval: steadier than the ratio of medians, which a few seeds changing places near the
    median move by 10 % (benchmarks/RESULTS.md 10f)."""
    ratios = np.array([d / t for d, t in zip(device, today, strict=True) if d is not None and t])
    if not len(ratios):
        return "-"
    rng = np.random.default_rng(0)
    low, high = np.percentile([np.median(rng.choice(ratios, len(ratios))) for _ in range(draws)],
                              [2.5, 97.5])
    return f"{np.median(ratios):.2f} [{low:.2f}, {high:.2f}]"


def main(limit: float | None = None, seeds: int = 10, parallel: int = 1, search: int = 1,
         answer: int = 0) -> None:
    """`search`: the recording replayed; `answer`: the recording that defines the best, the answers
    and the limit (0: the replayed one itself, which grades its own noise)."""
    searched = json.loads(landscape_path(*SIZE, search).read_text())
    truth = json.loads(landscape_path(*SIZE, answer).read_text()) if answer else None
    land = Landscape(searched, limit, truth)
    points = land.data["points"]
    print(f"# device-seconds to 98 % of the best feasible speedup ({len(points)}-point landscape, "
          f"{land.data['prompts']} prompts in batches of {land.batch_size}, {land.data['machine']}; "
          f"replaying recording {search}, answer from recording {answer or search})")
    print(f"PSNR limit {land.limit:.3f} dB; best feasible speedup {land.best:.2f}; the whole grid "
          f"costs {land.grid_seconds:.0f} device-seconds")
    rows, today, today_per_seed = [], None, None
    only = os.environ.get("REPLAY_ONLY")  # e.g. "new;new, GP sampler": only those (and today)
    for config in CONFIGS:
        named = bool(only) and config.name in only.split(";")
        if (only and not named and config.name != "today") or (config.on_request and not named):
            continue
        results = replay(land, config, seeds)
        reached = [r[0] for r in results if r[0] is not None]
        device = statistics.median(reached) if reached else None
        today = reached if config.name == "today" else today
        per_seed = [r[0] for r in results]
        today_per_seed = per_seed if config.name == "today" else today_per_seed
        rows.append([config.name, f"{len(reached)}/{seeds}", device,
                     ratio_with_interval(reached, today) if reached and today else "-",
                     f"{np.mean(reached) / np.mean(today):.2f}" if reached and today else "-",
                     f"{np.percentile(reached, 90) / np.percentile(today, 90):.2f}"
                     if reached and today else "-",
                     per_seed_ratio(per_seed, today_per_seed) if today_per_seed else "-",
                     statistics.median(r[2] for r in results if r[0] is not None) if reached else None,
                     "{} / {}".format(*sum(r[3] for r in results)),
                     sum(1 for r in results if r[3][1])])
        print(f"{config.name}: {[round(r[0]) if r[0] else None for r in results]}", flush=True)
    print(table(["rules", "reached", "median device-s", "vs today, median [95 % CI]",
                 "vs today, mean", "vs today, p90", "per seed vs today, median [95 % CI]",
                 "median trials",
                 "wrong stops: quality / speedup", "seeds that stopped an answer"], rows))

    if not parallel:
        return
    print("\n# parallel efficiency (rules: new; wall seconds to the goal, median over seeds)")
    rows, single = [], None
    new = next(c for c in CONFIGS if c.name == "new")
    for workers in (1, 2, 4, 8):
        results = replay(land, new, seeds, workers)
        walls = [r[1] for r in results if r[1] is not None]
        wall = statistics.median(walls) if walls else None
        single = wall if workers == 1 else single
        rows.append([workers, f"{len(walls)}/{seeds}", wall,
                     f"{single / wall:.2f}" if wall and single else "-",
                     statistics.median(r[0] for r in results if r[0] is not None) if walls else None])
    print(table(["workers", "reached", "median wall-s", "speedup over 1", "median device-s"], rows))

