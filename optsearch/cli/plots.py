"""`optsearch study plot`: PNGs of a study, with Optuna's matplotlib visualization where it has one."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from optsearch.errors import NothingToExport  # noqa: E402
from optsearch.measure.metrics import METRICS  # noqa: E402
from optsearch.optimize import objectives, reference  # noqa: E402
from optsearch.optimize import study as studies  # noqa: E402
from optsearch.storage.record import combo_label, is_copy, quality_of, speedup_of  # noqa: E402

logger = logging.getLogger(__name__)
FEW_FOR_IMPORTANCES = 20  # below this, an importance ranking moves with the next few trials


def plot_study(study: optuna.Study, spec, folder: Path) -> list[Path]:
    """Write speedup_vs_quality.png, history.png and importances.png (when computable).
    A study with no measured trial has nothing to plot: exit 3, as `export` with no answer."""
    if not study.get_trials(deepcopy=False, states=studies.FINISHED):
        raise NothingToExport(f"study {study.study_name!r} has no measured trial to plot yet "
                              f"(`optsearch worker --study {study.study_name}` measures them)")
    folder.mkdir(parents=True, exist_ok=True)
    written = [_save(speedup_vs_quality(study, spec).axes[0], folder / "speedup_vs_quality.png")]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    name = "speedup" if spec.objective.mode != "target-speedup" else spec.quality.metric
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")  # handled below
    if complete:
        ax = optuna.visualization.matplotlib.plot_optimization_history(
            study, target=lambda t: t.values[0], target_name=name)
        written.append(_save(ax, folder / "history.png"))
    try:
        # Optuna's default (PED-ANOVA) explains what makes the target LOW: flip maximized ones.
        sign = -1 if objectives.directions(spec)[0] == "maximize" else 1
        ax = optuna.visualization.matplotlib.plot_param_importances(
            study, target=lambda t: sign * t.values[0], target_name=name)
        few = " (few: indicative only)" if len(complete) < FEW_FOR_IMPORTANCES else ""
        ax.set_title("", loc="left")  # Optuna's own title, said again below with the count
        ax.figure.suptitle(f"Importances for {name}, from {len(complete)} trials{few}")
        written.append(_save(ax, folder / "importances.png"))
    except (RuntimeError, ValueError) as error:  # too few trials, or no parameter varies
        logger.warning("parameter importances not plotted: %s", error)
    return written


def _save(ax, path: Path) -> Path:
    figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def speedup_vs_quality(study: optuna.Study, spec) -> plt.Figure:
    """Every measured trial's speedup against its quality, each with its intervals, the feasible
    front, the fewer-steps line and the limit."""
    metric, limit = spec.quality.metric, spec.quality.limit
    trials = [t for t in study.get_trials(deepcopy=False, states=studies.FINISHED)
              if t.user_attrs.get("speedup") is not None and not is_copy(t)]
    figure, ax = plt.subplots(figsize=(8, 5))
    combos = sorted({combo_label(t) for t in trials})  # each distill recipe its own colour
    colours = plt.get_cmap("tab10")
    for index, combo in enumerate(combos):
        for feasible, marker, label in ((True, "o", "feasible"), (False, "x", "infeasible")):
            chosen = [t for t in trials
                      if combo_label(t) == combo and objectives.is_feasible(t) == feasible]
            if chosen:
                ax.scatter([_quality(t, metric) for t in chosen], [_speedup(t) for t in chosen],
                           marker=marker, s=40,
                           color=colours(index), label=f"{combo} ({label})")
                _interval_bars(ax, chosen, metric, colours(index))
    front = _front(trials, metric)
    if front:
        ax.plot([_quality(t, metric) for t in front], [_speedup(t) for t in front],
                color="black", linestyle="--", linewidth=1, label="feasible front")
    steps_line = reference.steps_frontier(study, spec)
    if steps_line:
        ax.plot([p[metric] for p in steps_line], [p["speedup"] for p in steps_line],
                color="grey", linestyle="-", linewidth=1.5, marker="s", markersize=4,
                label="fewer steps only (reference)")
    ax.axvline(limit, color="red", linewidth=1.2, label=f"{metric} limit {limit:g}")
    if spec.objective.mode == "target-speedup":
        ax.axhline(spec.objective.target_speedup, color="purple", linewidth=1.2,
                   label=f"target speedup {spec.objective.target_speedup:g}")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel(METRICS[metric].label)
    ax.set_ylabel("speedup over baseline (x)")
    ax.set_title(f"{study.study_name}: speedup vs quality ({len(trials)} trials; bars: "
                 f"{spec.quality.confidence:.0%} intervals)")
    ax.grid(alpha=0.3)
    if trials:
        ax.legend(fontsize=8, loc="best")
    return figure


def _interval_bars(ax, trials, metric: str, colour) -> None:
    """Each point's intervals, so that two settings a plot shows apart can be seen to be apart
    (or not); a side not measured enough to bound (a one-batch speedup) gets no bar."""
    for trial in trials:
        quality, speedup = quality_of(trial.user_attrs, metric), speedup_of(trial.user_attrs)
        x_err = [[quality.mean - quality.low], [quality.high - quality.mean]] \
            if math.isfinite(quality.low) and math.isfinite(quality.high) else None
        y_err = [[speedup.speedup - speedup.low], [speedup.high - speedup.speedup]] \
            if speedup.low is not None and speedup.high is not None else None
        if x_err or y_err:
            ax.errorbar([quality.mean], [speedup.speedup], xerr=x_err, yerr=y_err, fmt="none",
                        ecolor=colour, alpha=0.35, linewidth=1, capsize=2)


def _front(trials, metric: str):
    """Feasible trials not beaten on both speedup and quality, ordered along the quality axis."""
    sign = 1 if METRICS[metric].lower_is_better else -1
    feasible = [t for t in trials if objectives.is_feasible(t)]

    def loss(t):  # lower is better, whatever the metric
        return sign * _quality(t, metric)

    front = [t for t in feasible if not any(
        loss(o) <= loss(t) and _speedup(o) >= _speedup(t)
        and (loss(o) < loss(t) or _speedup(o) > _speedup(t)) for o in feasible)]
    return sorted(front, key=lambda t: _quality(t, metric))


def _quality(trial, metric: str) -> float:
    return quality_of(trial.user_attrs, metric).mean


def _speedup(trial) -> float:
    return speedup_of(trial.user_attrs).speedup
