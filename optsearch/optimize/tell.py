"""What a measured trial leaves behind: its record (storage/record.py), its constraints, its image
grid and dashboard note; then the values Optuna is told, or the prune of an early stop."""

from __future__ import annotations

import optuna

from optsearch.formatting import format_interval
from optsearch.measure.evaluate import Comparison
from optsearch.optimize import objectives
from optsearch.optimize.baseline import BaselineKeeper
from optsearch.optimize.recovery import retried
from optsearch.storage.artifacts import upload_grid
from optsearch.storage.notes import trial_note, write_trial_note
from optsearch.storage.record import measured_attrs, write_constraints
from optsearch.study_spec import StudySpec


def record_trial(trial: optuna.Trial, result: Comparison, spec: StudySpec, baselines: BaselineKeeper):
    """Store the trial's record, its image grid and dashboard note; return the values to tell
    Optuna, or raise TrialPruned for an early-stopped trial."""
    metric = spec.quality.metric
    attrs = measured_attrs(result, metric, baselines.baseline_id)
    summary = result.summary()
    constraints = objectives.constraints(spec, summary)
    storage = trial.study._storage
    retried(lambda: _write_record(trial, attrs, constraints), storage)
    quality = result.interval(metric)
    retried(lambda: upload_grid(
        baselines.artifacts, trial,
        f"trial-{trial.number:04d}_{result.combo}_speedup-{result.speedup:.2f}"
        f"_{metric}-{quality.mean:.3f}.png",
        f"trial {trial.number} {result.combo}: speedup {result.speedup_interval}, "
        f"{metric} {format_interval(quality)}",
        baselines.evaluator.prompts, spec.artifacts.grid_prompts,
        baselines.baseline.images, result.images, fps=spec.model.fps), storage)
    note = trial_note(trial.number, {**attrs, "combo": result.combo, "constraints": constraints}, spec)
    retried(lambda: write_trial_note(trial.study, trial._trial_id, note), storage)
    values = objectives.objective_values(spec, summary)
    if result.early_stopped:
        if len(values) == 1:  # what was measured, for the sampler (TPE ranks pruned trials by it)
            trial.report(values[0], result.batches_evaluated)
        raise optuna.TrialPruned(f"early stop ({result.early_stop_reason}) after "
                                 f"{result.batches_evaluated} of {result.n_batches} batches")
    return values if len(values) > 1 else values[0]


def _write_record(trial: optuna.Trial, attrs: dict, constraints: dict) -> None:
    """The trial's figures and constraints (each write may be repeated: `retried`)."""
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    write_constraints(trial.study, trial, constraints)
