"""The trial record: what one trial stores in Optuna's user attrs, written and read in one place.

A trial's figures live flat in its user attrs (JSON, so the dashboard and any SQL client read them):
`speedup`, `speedup_low`, `speedup_high`, each metric as `<metric>`, `<metric>_low`, `<metric>_high`
(None where a bound is infinite), the study's metric per prompt, per-batch seconds, and how the
trial ran. In memory they are `SpeedupInterval` and `Interval` objects: `measured_attrs` writes
them, `speedup_of` and `quality_of` read them back.

Who wrote what:
- the worker, when a trial starts: `worker`, `setting`, `combo`, `fingerprint`, `device`, `host`,
  `batch_size` (and `oom_halvings`, `fail_reason` when memory ran out);
- the worker, when it ends: `measured_attrs` below, then `constraints` (feasible when all <= 0);
- a trial that copies an earlier one's result: all of its attrs, plus `reused_from` and
  `reused_why`; its own `setting` where it differs (a MagCache setting that skips the same steps,
  a ToMe ratio that merges the same tokens).
"""

from __future__ import annotations

import datetime
import json
import math

import optuna
from optuna.trial import FrozenTrial, TrialState

from optsearch.measure.comparison import VIDEO_FIGURES, Comparison
from optsearch.measure.metrics import METRICS, Interval
from optsearch.measure.speedup import SpeedupInterval

# The older constraint form optuna-dashboard reads (Optuna 5 stores "constraints:<name>").
DASHBOARD_CONSTRAINTS_KEY = "constraints"
# What tables and exports show of a trial, in this order.
SHOWN_KEYS = ("combo", "setting", "speedup", "speedup_low", "speedup_high", "seconds_per_image",
              "baseline_seconds_per_image", "clip_mean",
              *(f"{m}{suffix}" for m in METRICS for suffix in ("", "_low", "_high", "_worst", "_p10")),
              "frames", "seconds_per_frame",
              *(f"{f}{suffix}" for f in VIDEO_FIGURES for suffix in ("", "_low", "_high")),
              "clip_image_cosine", "compute_fraction", "peak_memory_gib", "baseline_peak_memory_gib",
              "compiled", "compile_seconds", "graph_breaks", "compiled_while_timed",
              "batches_evaluated", "early_stopped", "device", "host",
              "batch_size", "fingerprint", "constraints", "reused_from", "reused_why")


def utc_now() -> str:
    """ISO 8601 in UTC, for every record's date: records from machines in any zone sort as text."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def finite(value: float | None) -> float | None:
    """JSON has no infinity: an unbounded side is stored as None."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def per_prompt_key(metric: str) -> str:
    """The user attr holding a trial's `metric` per prompt (early stop learns prompt effects from it)."""
    return f"{metric}_per_prompt"


def interval_attrs(metric: str, interval: Interval) -> dict:
    return {metric: interval.mean, f"{metric}_low": finite(interval.low),
            f"{metric}_high": finite(interval.high)}


def measured_attrs(result: Comparison, metric: str, baseline_id: str | None) -> dict:
    """The figures of a finished measurement, as stored on its trial."""
    attrs = {
        **result.speedup_interval.to_dict(),
        **(result.pass_noise.to_dict() if result.pass_noise is not None else {}),
        "seconds_per_image": result.seconds_per_image,
        "baseline_seconds_per_image": result.baseline_seconds_per_image,
        "clip_mean": result.clip_mean,
    }
    for name in result.metrics():
        attrs.update(interval_attrs(name, result.interval(name)))
    attrs.update(result.prompt_statistics())  # the worst prompt's figure, and nine in ten's
    if result.frames > 1:  # a video: per frame too, and its frame figures
        attrs.update({"frames": result.frames, "seconds_per_frame": result.seconds_per_frame})
        for name, interval in result.video_intervals().items():
            attrs.update(interval_attrs(name, interval))
    attrs.update({
        "clip_image_cosine": result.clip_image_cosine_mean,
        "compute_fraction": result.compute_fraction,  # denoiser work run, where families report it
        **result.compile_figures(),
        "peak_memory_gib": result.peak_memory_gib,  # during the timed batches (measure/memory.py)
        "baseline_peak_memory_gib": result.baseline_peak_memory_gib,
        "batches_evaluated": result.batches_evaluated,
        "n_batches": result.n_batches,
        "early_stopped": result.early_stopped,
        "early_stop_reason": result.early_stop_reason,
        "inference_seconds": result.inference_seconds,
        "batch_seconds": [float(v) for v in result.batch_seconds],  # per image, per batch
        "baseline_id": baseline_id,  # trials timed against one baseline timing share it
        "warmup_seconds": result.warmup_seconds,
        "scoring_seconds": result.scoring_seconds,
        "wall_seconds": result.wall_seconds,
        "image_digests": result.image_digests,
        per_prompt_key(metric): [float(v) for v in result.per_prompt(metric)],
    })
    if result.calibration_used:  # MagCache's ratios: its export and twins use its own
        attrs["calibration_used"] = result.calibration_used
    if result.early_stopped:
        per_batch = result.wall_seconds / result.batches_evaluated
        attrs["early_stop_saved_s"] = per_batch * (result.n_batches - result.batches_evaluated)
    return attrs


def quality_of(attrs: dict, metric: str) -> Interval | None:
    """A metric's interval from a trial's attrs, a confirmation record or a summary; None if not
    measured."""
    nested = attrs.get(metric)
    if isinstance(nested, Interval):  # a measurement's summary, in memory
        return nested
    if isinstance(nested, dict):  # a confirmation record keeps {"mean", "low", "high"}
        mean, low, high = nested.get("mean"), nested.get("low"), nested.get("high")
    else:
        mean, low, high = nested, attrs.get(f"{metric}_low"), attrs.get(f"{metric}_high")
    if mean is None:
        return None
    return Interval(mean, -math.inf if low is None else low, math.inf if high is None else high)


def speedup_of(attrs: dict) -> SpeedupInterval | None:
    """A trial's speedup with its interval; None if not measured."""
    if attrs.get("speedup") is None:
        return None
    return SpeedupInterval(attrs["speedup"], attrs.get("speedup_low"), attrs.get("speedup_high"))


def combo_label(trial: FrozenTrial) -> str:
    """The trial's combo as tables group it: "distill+steps", and where it drew a distill recipe
    its name with it ("distill+steps [8-step]"): which recipe wins is the question asked."""
    combo, recipe = trial.user_attrs.get("combo", "?"), trial.params.get("distill.recipe")
    return f"{combo} [{recipe}]" if recipe is not None else combo


def trial_metrics(trial: FrozenTrial) -> dict:
    """The figures recorded on a trial, for tables and exports."""
    metrics = {key: trial.user_attrs.get(key) for key in SHOWN_KEYS}
    if metrics["combo"] is not None:
        metrics["combo"] = combo_label(trial)
    metrics["trial"] = trial.number
    metrics["state"] = trial.state.name
    metrics["feasible"] = feasible(trial.user_attrs)
    return metrics


def write_constraints(study, trial, values: dict[str, float]) -> None:
    """Optuna's constraints (feasible when every value <= 0), in the three places they are read:
    Optuna's own keys (samplers), the `constraints` user attr (our readers), and the older list
    form optuna-dashboard 0.21 reads. Optuna keeps a constraint's first value; one written by an
    attempt the database dropped is the same value, so it is not written twice."""
    written = study._storage.get_trial_system_attrs(trial._trial_id)
    for name, value in values.items():
        if f"constraints:{name}" not in written:
            trial.set_constraint(name, value)
    trial.set_user_attr("constraints", values)
    study._storage.set_trial_system_attr(trial._trial_id, DASHBOARD_CONSTRAINTS_KEY, list(values.values()))


def feasible(attrs: dict) -> bool:
    """Did the trial (or confirmation record) meet every constraint it carries?"""
    values = attrs.get("constraints")
    return values is not None and all(v <= 0 for v in values.values())


def missed(attrs: dict) -> list[str]:
    """The constraints it missed ("quality", "memory", ...)."""
    return [name for name, value in (attrs.get("constraints") or {}).items() if value > 0]


def faster_than_baseline(attrs: dict) -> bool:
    """Did it run faster than the baseline? Not a slower setting, nor one that skipped nothing
    (every family reported computing all of it: DeepCache at interval 1, a threshold never
    reached): the baseline plus hooks, whose "1.04x" from a batch is noise."""
    inert = attrs.get("compute_fraction") is not None and attrs["compute_fraction"] >= 1.0
    return (attrs.get("speedup") or 0.0) > 1.0 and not inert


def computation_key(attrs: dict) -> str | None:
    """What a trial computed, told by its images: the same key, bit-identical images on every
    prompt from the same combo on the same device at the same batch size (None where no images
    were recorded)."""
    if not attrs.get("image_digests"):
        return None
    return json.dumps([attrs.get("fingerprint"), attrs.get("batch_size"), attrs.get("combo"),
                       attrs["image_digests"]])


def is_copy(trial: FrozenTrial) -> bool:
    """A trial that copied an earlier trial's result (`reused_from`: the sampler drew a setting
    measured already): it measured nothing, and takes none of the study's n_trials."""
    return trial.user_attrs.get("reused_from") is not None


def same_images(study: optuna.Study, trial: FrozenTrial) -> list[FrozenTrial]:
    """Other complete trials that made the trial's bit-identical images (all it made, for one
    stopped early) from its combo on the same device and batch size: adjacent thresholds often
    make the same skips. One computation timed again, so the spread of their speedups is timing
    noise, and the best of them is the luckiest timing of it. Copies of a result
    (`reused_from`) are not timings of their own."""
    attrs = trial.user_attrs
    if not attrs.get("image_digests"):
        return []
    timed = attrs.get("reused_from", trial.number)  # the trial whose timing this is
    return [other for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if other.number not in (trial.number, timed) and made_images(other.user_attrs, attrs)]


def made_images(other: dict, attrs: dict) -> bool:
    """Did the trial of `other` (a complete one's attrs) make every image `attrs` records (all
    made so far, for one being measured), from the same combo on the same device at the same
    batch size, timed itself (not a copied result)? Then they are one computation."""
    digests = attrs.get("image_digests")
    return (bool(digests) and other.get("reused_from") is None
            and (other.get("image_digests") or [])[:len(digests)] == digests
            and all(other.get(key) == attrs.get(key) for key in ("fingerprint", "batch_size", "combo")))
