"""Plain-text tables for the terminal: what `evaluate` and `study show` print."""

from __future__ import annotations


def table(headers: list[str], rows: list[list]) -> str:
    """Left-aligned columns, separated by two spaces, with a rule under the header."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_setting(setting: dict) -> str:
    """'deepcache(cache_interval=3, cache_branch_id=0) + tome(ratio=0.5)'."""
    parts = []
    for name, params in setting.items():
        values = ", ".join(f"{k}={_cell(v)}" for k, v in params.items())
        parts.append(f"{name}({values})")
    return " + ".join(parts) or "baseline"


def format_interval(interval: dict | None, digits: int = 3) -> str:
    """'0.120 [0.050, 0.190]' from {'mean', 'low', 'high'}; '-' for a missing bound."""
    if not interval or interval.get("mean") is None:
        return "-"

    def bound(value) -> str:
        return "-" if value is None or abs(value) == float("inf") else f"{value:.{digits}f}"

    return f"{interval['mean']:.{digits}f} [{bound(interval.get('low'))}, {bound(interval.get('high'))}]"


def format_speedup(figures: dict) -> str:
    """'2.10 [1.95, 2.27]' from a dict with speedup, speedup_low and speedup_high."""
    if figures.get("speedup") is None:
        return "-"
    return format_interval({"mean": figures["speedup"], "low": figures.get("speedup_low"),
                            "high": figures.get("speedup_high")}, digits=2)


def comparison_table(summary: dict) -> str:
    """Baseline vs one setting: seconds per image, speedup and CLIP loss with CIs, PSNR, SSIM."""
    percent = f"{round(100 * summary.get('confidence', 0.95))}%"
    rows = [
        ["baseline", summary["baseline_seconds_per_image"], "1", summary["baseline_clip_mean"],
         "-", "-", "-"],
        [summary["combo"], summary["seconds_per_image"], format_speedup(summary), summary["clip_mean"],
         format_interval(summary["clip_loss"]), format_interval(summary["psnr"], 2),
         format_interval(summary["ssim"])],
    ]
    headers = ["setting", "s/image", f"speedup [{percent} CI]", "CLIP", f"CLIP loss [{percent} CI]",
               "PSNR dB", "SSIM"]
    return table(headers, rows)


def trial_note(number: int, figures: dict, spec, confirmed: dict | None = None) -> str:
    """The Markdown note optuna-dashboard shows on a trial: what was measured and how sure it is."""
    from .study import metric_interval

    metric, confidence = spec.quality.metric, round(100 * spec.quality.confidence)
    constraints = figures.get("constraints") or {}
    feasible = bool(constraints) and all(v <= 0 for v in constraints.values())
    quality = metric_interval(figures, metric)
    lines = [f"## Trial {number}: {figures.get('combo', '?')}", "",
             f"- speedup **{format_speedup(figures)}** ({confidence} % CI, against this worker's "
             "own baseline)",
             f"- {metric} **{format_interval(quality)}** (limit {spec.quality.limit}, rule "
             f"{spec.quality.rule})",
             f"- {'feasible' if feasible else '**infeasible**'} in the search"]
    if figures.get("early_stopped"):
        lines.append(f"- early-stopped after {figures.get('batches_evaluated')} batches")
    if confirmed:
        lines += ["", f"### Confirmed on {confirmed['num_samples']} unseen prompts "
                      f"({confirmed['repeats']} interleaved rounds)",
                  f"- speedup **{format_speedup(confirmed)}**",
                  f"- {metric} **{format_interval(confirmed[metric])}**",
                  f"- {'feasible' if confirmed['feasible'] else '**infeasible**'} on confirmation"]
    return "\n".join(lines) + "\n"
