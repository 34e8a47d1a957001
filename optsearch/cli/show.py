"""What `optsearch study show` prints: baselines and each worker's timings, counts, the best per
combo with intervals, and confirmed figures beside the search's."""

from __future__ import annotations

import math
from collections import Counter

import optuna
from optuna.trial import TrialState

from optsearch.accelerators import CalibratedRange, calibrated_range
from optsearch.deployment import context_text
from optsearch.formatting import (
    auto_range_details,
    auto_range_text,
    format_interval,
    format_setting,
    format_speedup,
    table,
    too_wide,
)
from optsearch.optimize import objectives, reference
from optsearch.optimize import study as studies
from optsearch.optimize.export import deployment_of
from optsearch.optimize.winner import repeat_of, winner
from optsearch.storage.copy import COPIED_ATTR
from optsearch.storage.record import is_copy, quality_of, same_images, trial_metrics

STATE_WORDS = {"WAITING": "queued", "FAIL": "failed"}  # Optuna's states as `study list` says them
SHOWN_FAILURES = 5  # failed trials whose reasons `study show` prints, the last ones


def study_summary(study: optuna.Study, spec) -> dict:
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    states = Counter(t.state.name for t in trials)
    baselines = studies.baselines(study)  # one read of the study's attrs
    calibrations = {fingerprint: studies.calibration(study, fingerprint) for fingerprint in baselines}
    calibrated_ranges = {fingerprint: _ranges(stored) for fingerprint, stored in calibrations.items()}
    saved = sum(t.user_attrs.get("early_stop_saved_s", 0.0) for t in trials)
    summary = {
        "study": study.study_name,
        "mode": spec.objective.mode,
        "metric": spec.quality.metric,
        "limit": spec.quality.limit,
        "target_speedup": spec.objective.target_speedup,
        "constraint": objectives.constraint_text(spec),
        "n_trials": spec.search.n_trials,
        "model_steps": spec.model.steps,
        "states": {state.name: states.get(state.name, 0) for state in TrialState},
        "finished": states.get("COMPLETE", 0) + states.get("PRUNED", 0),
        "measured": len(studies.measured_trials(study)),  # what n_trials counts: copies are free
        "exhausted": list(studies.exhausted(study).values()),
        "copied_from": study.user_attrs.get(COPIED_ATTR, []),  # `study copy`, oldest first
        "early_stopped": sum(bool(t.user_attrs.get("early_stopped")) for t in trials),
        "early_stop_saved_s": saved,
        "early_stop_by_reason": _early_stop_by_reason(trials),
        "failed": [{"trial": t.number, "reason": t.user_attrs["fail_reason"]} for t in trials
                   if t.state == TrialState.FAIL and t.user_attrs.get("fail_reason")],
        "reused": sum(is_copy(t) for t in trials),
        "confidence": spec.quality.confidence,
        "rule": spec.quality.rule,
        "baselines": list(baselines.values()),
        "timings": studies.timings(study),
        "auto_ranges": {fingerprint: {name: list(calibrated) for name, calibrated in ranges.items()}
                        for fingerprint, ranges in calibrated_ranges.items()},
        "auto_ranges_by": {fingerprint: {name: list(calibrated.by)  # [param, {value: [lo, hi]}]
                                         for name, calibrated in ranges.items() if calibrated.by}
                           for fingerprint, ranges in calibrated_ranges.items()},
        "auto_ranges_at_steps": {  # {count: [[lo, hi], by or None]} at each step count calibrated
            fingerprint: {name: {count: [list(fewer), fewer.by]
                                 for count, fewer in sorted(calibrated.at_steps.items())}
                          for name, calibrated in ranges.items()}
            for fingerprint, ranges in calibrated_ranges.items()},
        "auto_ranges_under": {  # {LoRA: [lo, hi]} measured on each step-distilled LoRA
            fingerprint: {name: {lora: list(distilled) for lora, distilled in calibrated.under.items()}
                          for name, calibrated in ranges.items() if calibrated.under}
            for fingerprint, ranges in calibrated_ranges.items()},
        "auto_ranges_under_by": {  # {LoRA: [param, {value: [lo, hi]}]}, as auto_ranges_by
            fingerprint: {name: {lora: list(distilled.by) for lora, distilled in calibrated.under.items()
                                 if distilled.by}
                          for name, calibrated in ranges.items() if calibrated.under}
            for fingerprint, ranges in calibrated_ranges.items()},
        "tome_tokens": {fingerprint: stored["tome"]["tokens"] for fingerprint, stored in calibrations.items()
                        if (stored.get("tome") or {}).get("tokens")},  # {downsample: count}
        "confirmations": [{**record, "search": trial_metrics(by_number[record["trial"]])}
                          for record in sorted(studies.confirmations(study).values(),
                                               key=lambda r: r["date"])],
        "best_per_combo": {combo: trial_metrics(trial)
                           for combo, trial in objectives.best_per_combo(study, spec).items()},
        "front": ([trial_metrics(t) for t in objectives.pareto_front(study, spec)]
                  if spec.objective.mode == "pareto" else None),
        "steps_frontier": reference.steps_frontier(study, spec),
        "steps_missing": reference.missing_text(study, spec),
    }
    found = winner(study, spec)
    summary["best"] = trial_metrics(found.trial) if found else None
    summary["winner_rule"] = found.rule if found else None
    summary["winner_repeat"] = repeat_of(found) if found else None
    summary["winner_same_images"] = ([trial_metrics(t) for t in same_images(study, found.trial)]
                                     if found else [])
    summary["winner_deployment"] = (deployment_of(spec, found.trial, baselines.get(
        found.trial.user_attrs.get("fingerprint"))) if found else None)
    finished = [t for t in trials if t.state in studies.FINISHED]
    summary["nothing_feasible_hint"] = (objectives.relax_hint(spec, finished)
                                        if finished and not summary["best_per_combo"] else None)
    summary["fewer_steps"] = reference.verdict(summary["best"] or {}, summary["steps_frontier"],
                                               spec.quality.metric)
    return summary


def _ranges(calibration: dict) -> dict[str, CalibratedRange]:
    """{"family.param": its CalibratedRange} of one device's stored calibration."""
    return {f"{family}.{param}": calibrated_range(family, data, param) for family, data in calibration.items()
            for param in data.get("auto", {})}


def _early_stop_by_reason(trials) -> dict[str, dict]:
    """Per reason: trials stopped, batches not run and seconds saved."""
    reasons: dict[str, dict] = {}
    for trial in trials:
        attrs = trial.user_attrs
        if not attrs.get("early_stopped") or attrs.get("reused_from") is not None:
            continue
        entry = reasons.setdefault(attrs.get("early_stop_reason") or "quality",
                                   {"trials": 0, "batches_saved": 0, "seconds_saved": 0.0})
        entry["trials"] += 1
        entry["batches_saved"] += attrs.get("n_batches", 0) - attrs.get("batches_evaluated", 0)
        entry["seconds_saved"] += attrs.get("early_stop_saved_s", 0.0)
    return reasons


def format_summary(summary: dict) -> str:
    lines = [f"study {summary['study']}: mode {summary['mode']}, feasible when "
             f"{summary['constraint']}, {summary['measured']}/{summary['n_trials']} trials measured"]
    lines += [studies.exhausted_text(record) for record in summary["exhausted"]]
    lines += [f"copied from study {c['study']!r} in {c['storage']} with its {c['trials']} trials, "
              f"{c['at']}" for c in summary["copied_from"]]
    states = ", ".join(f"{STATE_WORDS.get(k, k.lower())} {v}" for k, v in summary["states"].items()
                       if v) or "none yet"
    saved = summary["early_stop_saved_s"]
    lines.append(f"trials: {states}; early-stopped {summary['early_stopped']} (saved ~{saved:.1f} s); "
                 f"reused {summary['reused']} (free copies of a measured setting or computation)")
    failed = summary["failed"]  # the last few; --json has them all
    lines += [f"  trial {f['trial']} failed: {f['reason']}" for f in failed[-SHOWN_FAILURES:]]
    if len(failed) > SHOWN_FAILURES:
        lines.append(f"  (and {len(failed) - SHOWN_FAILURES} earlier failed trials: --json lists all)")
    for reason, entry in summary["early_stop_by_reason"].items():
        lines.append(f"  early stop ({reason}): {entry['trials']} trials, {entry['batches_saved']} "
                     f"batches and ~{entry['seconds_saved']:.1f} s saved")
    lines.append("")
    lines.append("baselines (one per device fingerprint):")
    rows = [[b["fingerprint"], b["device"] + (f" ({b['offload']} offload)" if b.get("offload") else "")
             + (f" (attention {b['attention']})" if b.get("attention") not in (None, "native") else "")
             + (f" (quantized: {b['quantization']})" if b.get("quantization") else ""),
             b["dtype"], b["batch_size"], b["seconds_per_image"],
             b["clip_mean"], b["host"]] for b in summary["baselines"]]
    lines.append(table(["fingerprint", "device", "dtype", "batch", "s/image", "CLIP", "host"], rows)
                 if rows else "  (none yet)")
    for fingerprint, ranges in summary["auto_ranges"].items():
        for name, (low, high) in ranges.items():
            lines.append(f"auto range {name} on {fingerprint}: [{low}, {high}] ({auto_range_text(name)})")
            lines += auto_range_details(summary["auto_ranges_by"].get(fingerprint, {}).get(name),
                                        summary["auto_ranges_at_steps"].get(fingerprint, {}).get(name, {}),
                                        summary["model_steps"],
                                        _under(summary, fingerprint, name))
    for fingerprint, tokens in summary.get("tome_tokens", {}).items():
        levels = ", ".join(f"{count} at {level}x" for level, count in tokens.items())
        lines.append(f"tome tokens on {fingerprint}: {levels} downsampling (measured; a ratio merges "
                     f"int(tokens x ratio), so ratios under {1 / max(tokens.values()):.4f} apart may be "
                     "one computation, measured once)")
    if summary["timings"]:
        lines += ["", "baseline timings (each worker times its own; speedups use its own):"]
        lines.append(_timings_table(summary["timings"]))
    metric = summary["metric"]
    percent = f"{round(100 * summary['confidence'])}%"
    confirmed = {r["trial"]: r for r in summary["confirmations"]}
    lines += ["", f"best feasible trial per combo (search figures [{percent} CI]; rule "
                  f"{summary['rule']}):"]
    shown = _per_combo_rows(summary["best_per_combo"], summary["best"])
    rows = []
    for combo, m in shown:
        best = " *" if summary["best"] and m["trial"] == summary["best"]["trial"] else ""
        check = confirmed.get(m["trial"])
        rows.append([combo + best, m["trial"], format_speedup(m), _trial_interval(m, metric),
                     format_speedup(check) if check else "-",
                     format_interval(check[metric]) if check else "-",
                     _worst(m, metric), _computed(m.get("compute_fraction")),
                     _memory(m), format_setting(m["setting"] or {})])
    headers = ["combo", "trial", "speedup", metric, "confirmed speedup", f"confirmed {metric}",
               "worst prompt", "computed", "peak GiB (baseline)", "setting"]
    if any(m.get("frames") for _, m in shown):  # videos: frame figures
        headers[4:4] = ["worst-frame psnr", "temporal change"]
        for row, (_, m) in zip(rows, shown, strict=True):
            row[4:4] = [format_interval(quality_of(m, "psnr_worst_frame"), 2),
                        format_interval(quality_of(m, "temporal_change"))]
    if any(m.get("compiled") for _, m in shown):  # torch.compile
        headers.insert(-1, "compile s (graph breaks)")
        for row, (_, m) in zip(rows, shown, strict=True):
            row.insert(-1, f"{m.get('compile_seconds') or 0:.1f} ({m.get('graph_breaks')})"
                       + (" recompiled while timed" if m.get("compiled_while_timed") else ""))
    if len({m.get("fingerprint") for _, m in shown}) > 1:  # speedups are each against its device's
        headers.insert(2, "device")
        for row, (_, m) in zip(rows, shown, strict=True):
            row.insert(2, m.get("fingerprint") or "-")
    hint = summary.get("nothing_feasible_hint")
    lines.append(table(headers, rows) if rows else
                 "  (no feasible trial faster than the baseline yet" + (f": {hint})" if hint else ")"))
    if summary["best"]:
        lines.append(f"* winner: trial {summary['best']['trial']}, "
                     f"{format_setting(summary['best']['setting'] or {})}: the "
                     f"{summary['winner_rule']}; study export writes it")
        if summary.get("winner_deployment"):  # what its figures hold for
            lines.append(f"  measured at {context_text(summary['winner_deployment'])}: serve at it")
        if repeat := summary["winner_repeat"]:
            span = f"{repeat['low']:.2f}x-{repeat['high']:.2f}x"
            where = (f"is not measured enough to tell where it would read ({percent} range {span}): "
                     "`study confirm` measures it" if too_wide(repeat["low"], repeat["high"]) else
                     f"should read {span} ({percent}, from its {repeat['from']} figures; the "
                     "interval above is the true speedup's)")
            lines.append(f"  measured again (a fresh pass, its own baseline), its speedup {where}")
        if twins := summary.get("winner_same_images"):
            readings = [summary["best"]["speedup"], *(t["speedup"] for t in twins)]
            mean = math.exp(sum(map(math.log, readings)) / len(readings))
            lines.append(f"  {_trials_text(twins)} made the same images (the same computation) at "
                         f"{', '.join(format_speedup(t) for t in twins)}: the spread between their "
                         f"speedups and the winner's is timing noise (the {len(readings)} readings' "
                         f"geometric mean: {mean:.2f}x)")
    if summary.get("front"):  # pareto mode: the trade-off the user asked to see
        lines += ["", f"pareto front (feasible, non-dominated, fastest first; search figures "
                      f"[{percent} CI]):"]
        lines.append(table(
            ["trial", "combo", "speedup", metric, "confirmed speedup", f"confirmed {metric}",
             "setting"],
            [[m["trial"], m["combo"], format_speedup(m), _trial_interval(m, metric),
              format_speedup(confirmed[m["trial"]]) if m["trial"] in confirmed else "-",
              format_interval(confirmed[m["trial"]][metric]) if m["trial"] in confirmed else "-",
              format_setting(m["setting"] or {})] for m in summary["front"]]))
    if summary["steps_missing"]:
        lines += ["", f"reference: fewer steps only: {summary['steps_missing']}"]
    if summary["steps_frontier"]:
        lines += ["", "reference: fewer steps only (the line every setting must beat):"]
        lines.append(table(["steps", "trial", "speedup", metric],
                           [[p["num_inference_steps"], p["trial"], format_speedup(p),
                             _trial_interval(p, metric)] for p in summary["steps_frontier"]]))
        if summary["fewer_steps"] is not None:
            lines.append(f"winner trial {summary['best']['trial']} "
                         + reference.verdict_text(summary["fewer_steps"]))
    if summary["confirmations"]:
        lines += ["", "confirmations on unseen prompts, own noise (search | confirmed, A B B A rounds):"]
        lines.append(_confirmations_table(summary["confirmations"], metric))
    return "\n".join(lines)


def _per_combo_rows(best_per_combo: dict, winner: dict | None) -> list[tuple[str, dict]]:
    """(combo, figures) rows of the per-combo table: each combo's best search trial, and the
    winner under its combo's row when it is another trial (a confirmed winner need not be the
    search's best), so the starred answer is always in the table."""
    rows = list(best_per_combo.items())
    if winner is None or any(m["trial"] == winner["trial"] for _, m in rows):
        return rows
    combos = [combo for combo, _ in rows]
    at = combos.index(winner["combo"]) + 1 if winner.get("combo") in combos else len(rows)
    return rows[:at] + [(winner.get("combo") or "?", winner)] + rows[at:]


def winner_cell(mark: dict | None) -> str:
    """'trial 7: 2.31 [2.10, 2.54] confirmed': the winner the workers marked (mark_winner), its
    speedup with its interval, and whether that is the search's figure or a confirmation's."""
    if not mark or mark.get("speedup") is None:
        return "-"
    figure = format_speedup(mark) if "speedup_low" in mark else f"{mark['speedup']:.2f}x"  # older
    return f"trial {mark['trial']}: {figure} " + ("confirmed" if mark.get("confirmed") else "search")


def _trials_text(figures: list[dict]) -> str:
    numbers = [str(f["trial"]) for f in figures]
    return f"trial {numbers[0]}" if len(numbers) == 1 else f"trials {', '.join(numbers)}"


def _worst(metrics: dict, metric: str) -> str:
    """The worst prompt's figure of a trial (recorded since issue 25)."""
    value = metrics.get(f"{metric}_worst")
    return "-" if value is None else f"{value:.3f}"


def _memory(figures: dict) -> str:
    """'3.21 (2.90)': the setting's peak memory in its timed batches, and the baseline's."""
    peak, baseline = figures.get("peak_memory_gib"), figures.get("baseline_peak_memory_gib")
    if peak is None:
        return "-"
    return f"{peak:.2f}" + (f" ({baseline:.2f})" if baseline is not None else "")


def _computed(fraction: float | None) -> str:
    """The share of the denoiser's work a setting ran, where its families report it."""
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _trial_interval(metrics: dict, metric: str) -> str:
    return format_interval(quality_of(metrics, metric))


def _under(summary: dict, fingerprint: str, name: str) -> dict:
    """{LoRA: (bounds, by)} of an "auto" range measured on each step-distilled LoRA."""
    bounds = summary["auto_ranges_under"].get(fingerprint, {}).get(name, {})
    by = summary["auto_ranges_under_by"].get(fingerprint, {}).get(name, {})
    return {lora: (low_high, by.get(lora)) for lora, low_high in bounds.items()}


def _timings_table(timings: list[dict]) -> str:
    rows = []
    for record in timings:
        seconds = [t["seconds_per_image"] for t in record["timings"]]
        rows.append([record["worker"], record["device_index"], record["fingerprint"], len(seconds),
                     seconds[0] if seconds else None, seconds[-1] if seconds else None,
                     record["timings"][0]["at"] if seconds else None])
    return table(["worker", "device", "fingerprint", "timings", "first s/image", "last s/image",
                  "timed at"], rows)


def _confirmations_table(records: list[dict], metric: str) -> str:
    rows = [[r["trial"], r["search"]["combo"] or r["combo"], format_speedup(r["search"]), format_speedup(r),
             _trial_interval(r["search"], metric), format_interval(r[metric]), r["num_samples"],
             r["repeats"], "yes" if r["feasible"] else "NO", f"{r['device']} {r['fingerprint']}",
             format_setting(r.get("setting") or {})]
            for r in records]
    return table(["trial", "combo", "search speedup", "confirmed speedup", f"search {metric}",
                  f"confirmed {metric}", "prompts", "rounds", "feasible", "device fingerprint",
                  "setting"], rows)
