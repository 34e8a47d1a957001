"""The Markdown note optuna-dashboard shows on each trial: what was measured and how sure it is."""

from __future__ import annotations

from optuna_dashboard._note import get_note_from_system_attrs, note_ver_key, save_note_with_version

from optsearch.formatting import compile_text, format_interval, format_setting, format_speedup
from optsearch.storage.record import faster_than_baseline, feasible, missed, quality_of, same_images


def trial_line(study, trial_id: int, spec, winner: int | None = None) -> str | None:
    """One line per finished trial, for a worker's terminal or log (a Kubernetes pod's, a SLURM
    task's): its setting, its figures with their intervals, what became of it, and the trials
    that made its very images. None for a trial that never got a setting (a slot other workers
    had filled)."""
    from optuna.trial import TrialState

    trial = study._storage.get_trial(trial_id)
    attrs = trial.user_attrs
    if not attrs.get("setting"):
        return None
    head = f"trial {trial.number} {_searched_setting(attrs['setting'], spec)}"
    if attrs.get("speedup") is None:  # failed (out of memory, a bug) or cut off
        reason = (attrs.get("fail_reason") or "").replace(f" with {format_setting(attrs['setting'])}", "")
        return f"{head}: {trial.state.name.lower()}" + (f" ({reason})" if reason else "")
    metric = spec.quality.metric
    if attrs.get("reused_from") is not None:
        verdict = (f"the result of trial {attrs['reused_from']} "
                   f"({attrs.get('reused_why', 'same setting, same device')})")
    elif trial.state == TrialState.PRUNED:
        verdict = (f"stopped early ({attrs.get('early_stop_reason')}) after "
                   f"{attrs.get('batches_evaluated')} of {attrs.get('n_batches')} batches")
        if attrs.get("early_stop_reason") == "same images":
            verdict += f": those of trial {', '.join(str(t.number) for t in same_images(study, trial))}"
    else:
        verdict = _feasibility(attrs)
        if feasible(attrs) and not faster_than_baseline(attrs):
            verdict += ", not faster than the baseline"
    twins = (same_images(study, trial) if trial.state == TrialState.COMPLETE
             and attrs.get("reused_from") is None else [])
    if twins:
        verdict += (f", the same images as trial {', '.join(str(t.number) for t in twins)} (the "
                    "same computation, timed again)")
    lead = f"; the winner so far: trial {winner}" if winner is not None else ""
    return (f"{head}: speedup {format_speedup(attrs)}, {metric} "
            f"{format_interval(quality_of(attrs, metric))}: {verdict}{lead}")


def _searched_setting(setting: dict, spec) -> str:
    """A setting as a log line names it: the parameters the study searches (the rest are the
    spec's, and the record keeps them)."""
    combo = tuple(setting)
    return format_setting(setting, {family: spec.searched_params(family, combo) for family in setting})


def confirmed_line(record: dict, spec) -> str:
    """One line per setting confirmed, as it is stored: the unseen-prompt figures a user acts on."""
    metric = spec.quality.metric
    verdict = _feasibility(record)
    return (f"confirmed trial {record['trial']} {_searched_setting(record['setting'], spec)} on "
            f"{record['num_samples']} unseen prompts: speedup {format_speedup(record)} "
            f"({record['repeats']} A B B A rounds), {metric} "
            f"{format_interval(quality_of(record, metric))}: {verdict}")


def _feasibility(attrs: dict) -> str:
    """'feasible', or 'infeasible (quality, memory)': which constraints it missed."""
    return "feasible" if feasible(attrs) else f"infeasible ({', '.join(missed(attrs))})"


def trial_note(number: int, figures: dict, spec, confirmed: dict | None = None) -> str:
    """The Markdown note optuna-dashboard shows on a trial: what was measured and how sure it is."""
    metric, confidence = spec.quality.metric, round(100 * spec.quality.confidence)
    quality = quality_of(figures, metric)
    lines = [f"## Trial {number}: {figures.get('combo', '?')}", "",
             f"- speedup **{format_speedup(figures)}** ({confidence} % CI, against this worker's "
             "own baseline)",
             f"- {metric} **{format_interval(quality)}** (limit {spec.quality.limit}, rule "
             f"{spec.quality.rule})",
             f"- {'feasible' if feasible(figures) else '**infeasible**'} in the search"]
    if figures.get(f"{metric}_worst") is not None:
        lines.insert(-1, f"- worst prompt: {metric} {figures[f'{metric}_worst']:.3f}; nine prompts "
                         f"in ten at least {figures[f'{metric}_p10']:.3f}"
                         + (f" (quality.statistic = {spec.quality.statistic})"
                            if spec.quality.statistic != "mean" else ""))
    if figures.get("frames"):
        worst, steady = quality_of(figures, "psnr_worst_frame"), quality_of(figures, "temporal_change")
        lines.append(f"- video of {figures['frames']} frames: "
                     f"{figures['seconds_per_frame']:.3g} s/frame; worst frame PSNR "
                     f"{format_interval(worst, 2)} dB; temporal change {format_interval(steady)} "
                     "x the baseline's (above 1: more flicker)")
    if figures.get("compute_fraction") is not None:
        lines.append(f"- computed **{100 * figures['compute_fraction']:.0f} %** of the denoiser's "
                     "blocks x steps (the rest skipped)")
    if figures.get("compiled"):
        lines.append(f"- {compile_text(figures, strong='**')}")
    if figures.get("peak_memory_gib") is not None:
        baseline = figures.get("baseline_peak_memory_gib")
        limit = spec.objective.max_memory_gib
        lines.append(f"- peak memory **{figures['peak_memory_gib']:.2f} GiB** in its timed batches"
                     + (f" (baseline {baseline:.2f} GiB)" if baseline is not None else "")
                     + (f"; limit {limit} GiB (objective.max_memory_gib)" if limit else ""))
    if figures.get("pass_noise") is not None:
        measured = (f"from {figures['pass_noise_probes']} baseline probes, the baseline passes and "
                    "search.pass_noise" if figures.get("pass_noise_probes")
                    else "assumed (search.pass_noise) until probes measure it")
        lines.append(f"- the speedup interval counts a {figures['pass_noise']:.1f} % pass-to-pass "
                     f"speed spread, {measured}")
    if figures.get("early_stopped"):
        lines.append(f"- early-stopped after {figures.get('batches_evaluated')} batches")
    if confirmed:
        lines += ["", f"### Confirmed on {confirmed['num_samples']} unseen prompts "
                      f"({confirmed['repeats']} A B B A timing rounds, own noise)",
                  f"- speedup **{format_speedup(confirmed)}**",
                  f"- {metric} **{format_interval(confirmed[metric])}**",
                  f"- {'feasible' if confirmed['feasible'] else '**infeasible**'} on confirmation"]
    return "\n".join(lines) + "\n"


def failure_note(number: int, attrs: dict) -> str:
    """The note optuna-dashboard shows on a failed trial: why, with what it ran (its reason
    names the setting where one was drawn)."""
    return f"## Trial {number}: failed\n\n{attrs['fail_reason']}\n"


def write_trial_note(study, trial_id: int, body: str) -> None:
    """Set a trial's Markdown note, the study's own with None (optuna-dashboard's notes live in the
    study's system attrs, so a finished trial's note can still be updated, as `study confirm`
    does); the same text is not written again (the workers re-mark the winner after every trial)."""
    storage = study._storage
    attrs = storage.get_study_system_attrs(study._study_id)
    if get_note_from_system_attrs(attrs, trial_id)["body"] == body:  # nothing new to say
        return
    version = attrs.get(note_ver_key(trial_id), 0) + 1
    save_note_with_version(storage, study._study_id, trial_id, version, body)


def read_note(study, trial_id: int | None) -> str:
    """A trial's Markdown note (the study's own with None), "" when it has none."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    return get_note_from_system_attrs(attrs, trial_id)["body"]
