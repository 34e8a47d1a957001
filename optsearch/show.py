"""What `optsearch study show` and `study list` print: baselines, counts, best per combo."""

from __future__ import annotations

from collections import Counter

import optuna
from optuna.trial import TrialState

from . import study as studies
from .report import format_setting, table


def study_summary(study: optuna.Study, spec) -> dict:
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    saved = sum(t.user_attrs.get("early_stop_saved_s", 0.0) for t in trials)
    return {
        "study": study.study_name,
        "mode": spec.objective.mode,
        "metric": spec.quality.metric,
        "limit": spec.quality.limit,
        "n_trials": spec.search.n_trials,
        "states": {state.name: states.get(state.name, 0) for state in TrialState},
        "finished": states.get("COMPLETE", 0) + states.get("PRUNED", 0),
        "early_stopped": sum(bool(t.user_attrs.get("early_stopped")) for t in trials),
        "early_stop_saved_s": saved,
        "reused": sum(t.user_attrs.get("reused_from") is not None for t in trials),
        "baselines": list(studies.baselines(study).values()),
        "best_per_combo": {combo: studies.trial_metrics(trial)
                           for combo, trial in studies.best_per_combo(study, spec).items()},
        "best": (lambda t: studies.trial_metrics(t) if t else None)(studies.best_overall(study, spec)),
    }


def format_summary(summary: dict) -> str:
    lines = [f"study {summary['study']}: mode {summary['mode']}, {summary['metric']} limit "
             f"{summary['limit']}, {summary['finished']}/{summary['n_trials']} trials finished"]
    states = ", ".join(f"{k.lower()} {v}" for k, v in summary["states"].items() if v)
    saved = summary["early_stop_saved_s"]
    lines.append(f"trials: {states}; early-stopped {summary['early_stopped']} (saved ~{saved:.1f} s); "
                 f"reused {summary['reused']}")
    lines.append("")
    lines.append("baselines (one per device fingerprint):")
    rows = [[b["fingerprint"], b["device"], b["dtype"], b["batch_size"], b["seconds_per_image"],
             b["clip_mean"], b["host"]] for b in summary["baselines"]]
    lines.append(table(["fingerprint", "device", "dtype", "batch", "s/image", "CLIP", "host"], rows)
                 if rows else "  (none yet)")
    lines.append("")
    lines.append("best feasible trial per combo:")
    rows = []
    for combo, m in summary["best_per_combo"].items():
        best = " *" if summary["best"] and m["trial"] == summary["best"]["trial"] else ""
        rows.append([combo + best, m["trial"], m["speedup"], m["clip_loss"], m["psnr"], m["ssim"],
                     format_setting(m["setting"] or {})])
    lines.append(table(["combo", "trial", "speedup", "CLIP loss", "PSNR", "SSIM", "setting"], rows)
                 if rows else "  (no feasible trial yet)")
    return "\n".join(lines)
