"""search_params.json: a study's answer as a file that deploys without optsearch (`optsearch.apply`)."""

from __future__ import annotations

import platform
from importlib.metadata import version

import optuna
from optuna.trial import FrozenTrial, TrialState

from optsearch.deployment import measured_context
from optsearch.errors import NothingToExport
from optsearch.measure.prompts import prompt_seed
from optsearch.optimize.objectives import (
    best_per_combo,
    constraint_text,
    merit,
    pareto_front,
    relax_hint,
)
from optsearch.optimize.reference import missing_text, steps_frontier, verdict
from optsearch.optimize.study import (
    FINISHED,
    baselines,
    calibration,
    confirmations,
    exhausted,
    measured_trials,
    spec_attr,
)
from optsearch.optimize.winner import latest_by_trial, repeat_of, winner
from optsearch.storage.record import same_images, speedup_of, trial_metrics, utc_now
from optsearch.version import __version__

FORMAT = "optsearch.search_params/1"


def _entry(trial, confirmed: dict | None = None, metric: str = "clip_loss") -> dict:
    metrics = trial_metrics(trial)
    return {"trial": trial.number, "combo": metrics.pop("combo"), "setting": metrics.pop("setting"),
            "values": list(trial.values), "metrics": metrics,
            "image_digests": trial.user_attrs.get("image_digests"),
            "confirmed": confirmed_entry(confirmed, metric) if confirmed else None}


CONFIRMED_KEYS = ("prompts", "num_samples", "seed", "repeats", "speedup", "speedup_low",
                  "speedup_high", "seconds_per_image", "baseline_seconds_per_image", "feasible",
                  "rule", "image_digests", "device", "fingerprint", "date")


def confirmed_entry(record: dict, metric: str) -> dict:
    """The `confirmed` object of an exported setting: unseen-prompt figures of its confirmation."""
    return {**{key: record.get(key) for key in CONFIRMED_KEYS}, metric: record[metric]}


def unconfirmed_better(study, spec, found, fingerprint: str | None) -> list[int]:
    """Trials never confirmed whose search figures beat the confirmed winner's search figures
    (finished after the last `study confirm`, or below its --top): `study confirm` would see them.
    A trial that made a confirmed trial's very images is that computation, confirmed already:
    its better search figure is a luckier timing, not another setting to measure."""
    if found.confirmed is None:
        return []
    confirmed = {r["trial"] for r in confirmations(study).values()}
    winner_merit = merit(spec, found.trial.values[0]) if found.trial.values else None
    if winner_merit is None or spec.objective.mode == "pareto":
        return []
    return sorted(trial.number for trial in best_per_combo(study, spec, fingerprint).values()
                  if trial.number not in confirmed and merit(spec, trial.values[0]) > winner_merit
                  and not {t.number for t in same_images(study, trial)} & confirmed)


def _prompts(baseline: dict | None, spec) -> dict:
    """The search prompts and per-prompt generator seeds that `image_digests` belong to."""
    texts = (baseline or {}).get("prompts")
    count = len(texts) if texts else spec.prompts.num_samples
    return {"texts": texts, "seeds": [prompt_seed(spec.prompts.seed, i) for i in range(count)],
            "batch_size": (baseline or {}).get("batch_size", spec.prompts.batch_size)}


def _meets(spec) -> str:
    """What a winner must do: meet the constraint, and (unless a target speedup says it) beat
    the baseline."""
    if spec.objective.mode == "target-speedup":
        return f"meets {constraint_text(spec)}"
    return f"both meets {constraint_text(spec)} and runs faster than the baseline"


def deployment_of(spec, trial: FrozenTrial, baseline: dict | None) -> dict:
    """The context `trial`'s figures hold for (batch, size, steps, device, compile, LoRA, ...),
    from the spec, the trial's record and its device's baseline (`measured_context`)."""
    measured_with = baseline or {}
    return measured_context(
        spec, trial.user_attrs.get("batch_size", spec.prompts.batch_size),
        trial.user_attrs.get("compiled"), measured_with.get("device", trial.user_attrs.get("device")),
        measured_with.get("dtype"), measured_with.get("offload", "none") if baseline else None,
        measured_with.get("attention"), measured_with.get("scheduler"), measured_with,
        measured_with.get("quantization", "none") if baseline else None,
        measured_with.get("true_cfg_scale"))


def export_study(study, spec, fingerprint: str | None = None) -> dict:
    """search_params.json: the winner (optimize/winner.py), the best per combo, baseline, spec,
    provenance — all of one device fingerprint (`fingerprint`, else the one the confirmations
    were made on; several is a UsageError listing them)."""
    found = winner(study, spec, fingerprint, strict=True)
    fingerprint = found.fingerprint if found else fingerprint
    metric = spec.quality.metric
    records = [r for r in confirmations(study).values()
               if fingerprint is None or r["fingerprint"] == fingerprint]
    if found is None and records:
        raise NothingToExport(f"none of the {len(records)} settings confirmed on unseen prompts "
                              f"of study {study.study_name!r} {_meets(spec)} there: "
                              f"{relax_hint(spec, records)}, then `study confirm` again")
    if found is None:
        trials = study.get_trials(deepcopy=False)  # one read: the finished, and how many failed
        finished = [trial for trial in trials if trial.state in FINISHED]
        failed = sum(trial.state == TrialState.FAIL for trial in trials)
        if not finished:  # nothing to relax: nothing was measured
            raise NothingToExport(f"study {study.study_name!r} has no measured trial yet" + (
                f" ({failed} failed: `study show` says why)" if failed else ": start a worker"))
        raise NothingToExport(f"study {study.study_name!r} has no feasible trial yet (none "
                              f"{_meets(spec)}): {relax_hint(spec, finished)}")
    best = found.trial
    baseline = baselines(study).get(best.user_attrs.get("fingerprint"))  # one read of the attrs
    measured_with = baseline or {}
    confirmed_by_trial = latest_by_trial(records)
    if found.confirmed is not None:
        confirmed_by_trial[best.number] = found.confirmed
    exported = {
        "format": FORMAT,
        "study": study.study_name,
        "mode": spec.objective.mode,
        "metric": spec.quality.metric,
        "limit": spec.quality.limit,
        "target_speedup": spec.objective.target_speedup,
        "best": _entry(best, confirmed_by_trial.get(best.number), metric),
        "winner_rule": found.rule,
        # where a user's own fresh measurement of the winner should read (the interval is the
        # true speedup's; a repeat carries its own noise too)
        "repeat_speedup": repeat_of(found),
        # trials that made the winner's very images: the same computation timed again
        "same_images": [{"trial": t.number, **speedup_of(t.user_attrs).to_dict()}
                        for t in same_images(study, best)],
        "fingerprint": best.user_attrs.get("fingerprint") if fingerprint is None else fingerprint,
        # what the server should run for these figures to hold; `optsearch.apply` warns otherwise
        "deployment": deployment_of(spec, best, baseline),
        "unconfirmed_better": unconfirmed_better(study, spec, found, fingerprint),
        "per_combo": {combo: _entry(trial, confirmed_by_trial.get(trial.number), metric)
                      for combo, trial in best_per_combo(study, spec, fingerprint).items()},
        "baseline": baseline,
        "prompts": _prompts(baseline, spec),
        "spec": {"name": spec.name, **spec_attr(spec)},
        "provenance": {  # torch and diffusers: the versions that measured (the baseline's)
            "optsearch": __version__, "optuna": optuna.__version__,
            "torch": measured_with.get("torch") or version("torch"),
            "diffusers": measured_with.get("diffusers") or version("diffusers"),
            "device": best.user_attrs.get("device"),
            "host": best.user_attrs.get("host"), "python": platform.python_version(),
            "date": utc_now(),
        },
    }
    exported["search"] = {  # what the answer rests on: a sample of the space, or all of it
        "n_trials": spec.search.n_trials, "space_size": spec.space_size(),
        "measured": sum(t.user_attrs.get("fingerprint") == exported["fingerprint"]
                        for t in measured_trials(study)),
        "exhausted": exported["fingerprint"] in exhausted(study)}
    if exported["baseline"] is not None:
        exported["baseline"] = {k: v for k, v in exported["baseline"].items()
                                if k not in ("clip_scores", "prompts")}
    measured = {**calibration(study, best.user_attrs.get("fingerprint", "")),
                **best.user_attrs.get("calibration_used", {})}  # what the winner itself ran with
    if measured:
        exported["calibration"] = measured  # MagCache's ratios: `optsearch.apply` passes them on
    frontier = steps_frontier(study, spec)
    if frontier:
        exported["fewer_steps"] = {
            "frontier": frontier,
            # search figures against search figures: the same prompts measured both
            "best": verdict(exported["best"]["metrics"], frontier, metric),
        }
    elif why := missing_text(study, spec):
        exported["fewer_steps"] = {"frontier": [], "best": None, "missing": why}
    if spec.objective.mode == "pareto":
        exported["front"] = [_entry(trial, confirmed_by_trial.get(trial.number), metric)
                             for trial in pareto_front(study, spec)]
    return exported
