"""One real study on builtin:cpu-bench, with today's rules and with the new ones.

Same spec and sampler seed twice (128 px, 20 steps, 6 prompts in batches of 2, DeepCache+ToMe+T-GATE,
PSNR limit, 16 trials, SQLite):

- before: early stop on quality only (as it was), a full warm-up batch per trial, no warm start;
- now:    what a study does now: speedup-aware early stop with pooled timing noise (dominated:
          the trial's and the best's noise in quadrature; after the first batch once the
          device's first-batch record holds 5 trials), the one-sided quality look from the
          first batch (the prompts' own effects removed once 5 trials ran on all prompts), the
          published warm start, the short warm-up before a worker's first trial of a combo and
          none after.

Reports batches run, device seconds in pipeline calls (warm-up included), wall time and the winner.
"""

from __future__ import annotations

import time

from benchmarks.common import ROOT, machine, scratch, table
from benchmarks.replay import IssueTimeQualityStop
from optsearch import load_spec
from optsearch.measure.evaluate import evaluator_from_spec
from optsearch.optimize.create import create_study
from optsearch.optimize.objectives import best_overall
from optsearch.optimize.worker import Worker, WorkerOptions
from optsearch.storage.rdb import open_storage


def issue_time_rule(spec, finished, fingerprint, baseline_id, combo=None):
    """The early stop as it was when the issue was filed: quality only, two-sided, no
    finite-population correction (search_cost.IssueTimeQualityStop)."""
    return IssueTimeQualityStop(spec.quality.limit)  # min_batches 2, as it was


def run(new_rules: bool, limit: float, n_trials: int, seed: int) -> list:
    spec = load_spec(ROOT / "studies" / "cpu-bench.toml")
    spec.model.height = spec.model.width = 128
    spec.prompts.num_samples, spec.prompts.batch_size = 6, 2
    spec.quality.metric, spec.quality.limit = "psnr", limit
    spec.search.accelerators = ["deepcache", "tome", "tgate"]
    spec.search.n_trials, spec.search.seed = n_trials, seed
    spec.search.warm_start = ["published"] if new_rules else []
    spec.space = {"deepcache": {"cache_interval": [2, 6], "cache_branch_id": [0, 2]},
                  "tome": {"ratio": [0.1, 0.7, 0.2], "max_downsample": 1},
                  "tgate": {"gate_step": [4, 16, 4]}}
    folder = scratch()
    url = f"sqlite:///{folder / 'bench.db'}"
    create_study(spec, open_storage(url, heartbeat_interval=None))
    options = WorkerOptions(progress=False, artifact_dir=str(folder / "artifacts"))
    evaluator = evaluator_from_spec(spec)
    if not new_rules:
        options.stop_rule = issue_time_rule
        evaluator = evaluator.derive(warmup=spec.model.steps)  # a full warm-up batch, as before
    worker = Worker(url, spec.name, options, evaluator)
    started = time.perf_counter()
    worker.run()
    wall = time.perf_counter() - started
    trials = [t for t in worker.study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")
              and t.user_attrs.get("reused_from") is None]
    batches = sum(t.user_attrs["batches_evaluated"] for t in trials)
    device = sum(t.user_attrs["inference_seconds"] + t.user_attrs["warmup_seconds"] for t in trials)
    stopped = [t.user_attrs.get("early_stop_reason") for t in trials if t.user_attrs.get("early_stopped")]
    best = best_overall(worker.study, worker.spec)
    return ["now" if new_rules else "before", len(trials), batches,
            ", ".join(f"{r} {stopped.count(r)}" for r in sorted(set(stopped))) or "-",
            device, wall, f"trial {best.number}: {best.user_attrs['speedup']:.2f}x, "
            f"{best.user_attrs['psnr']:.1f} dB" if best else "none"]


def main(limit: float = 34.8, n_trials: float = 16, seed: float = 0) -> None:
    n_trials, seed = int(n_trials), int(seed)
    rows = [run(new_rules, limit, n_trials, seed) for new_rules in (False, True)]
    print(f"# one real study each, builtin:cpu-bench 128 px, PSNR >= {limit} dB, {n_trials} trials, "
          f"TPE seed {seed} ({machine()})")
    print(table(["rules", "trials measured", "batches", "early stops", "device s (pipeline)",
                 "wall s", "winner"], rows))

