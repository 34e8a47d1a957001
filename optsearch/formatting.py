"""Plain text of figures: tables, settings, intervals. What the terminal and dashboard notes show."""

from __future__ import annotations

from optsearch.measure.metrics import Interval

AUTO_RANGE = ("calibrated on the search's first batch: from skipping nothing of it to skipping "
              "nearly every step")
AUTO_RANGE_FROM_RATIOS = ("from the model's magnitude ratios: a trial samples from the threshold "
                          "that skips its first step to the one past which its max_skip_steps, "
                          "retention_ratio and step count allow no more skips; below, the ranges "
                          "at the model's steps")


def auto_range_text(name: str) -> str:
    """How the "auto" range of `name` ("family.param") was found, for the line that shows it."""
    return AUTO_RANGE_FROM_RATIOS if name.startswith("magcache.") else AUTO_RANGE


def per_value_text(by) -> str:
    """'  per Fn_compute_blocks: 1 [0.39, 0.56], 2 [...]': the ranges of an "auto" parameter
    that moves with another (`CalibratedRange.by`, as stored: [param, {value: [lo, hi]}])."""
    param, ranges = by
    return f"  per {param}: " + ", ".join(f"{value} [{lo}, {hi}]" for value, (lo, hi) in ranges.items())


def auto_range_details(by, at_steps: dict, model_steps: int, under: dict | None = None) -> list[str]:
    """The lines `check` and `study show` print under an "auto" range: its ranges per value of
    the parameter it moves with (`by`), those at fewer steps than the model's (`at_steps`,
    {count: (bounds, by)}; a trial in between samples in the blend), and those measured on each
    step-distilled LoRA its trials run (`under`, {LoRA: (bounds, by)}). The counts are the
    steps that denoise (image-to-image: a share of each call's), the model's the largest."""
    model_steps = max([int(count) for count in at_steps], default=model_steps)
    lines = [per_value_text(by)] if by else []  # a trial samples in the range of the value it drew
    for count, (fewer, fewer_by) in sorted(at_steps.items(), key=lambda item: int(item[0])):
        if int(count) != model_steps:
            per_value = f"; {per_value_text(fewer_by).strip()}" if fewer_by else ""
            lines.append(f"  at {count} steps (above: at the model's {model_steps}; a step count in "
                         f"between samples in their blend): [{fewer[0]}, {fewer[1]}]{per_value}")
    for lora, ((low, high), lora_by) in (under or {}).items():
        per_value = f"; {per_value_text(lora_by).strip()}" if lora_by else ""
        lines.append(f"  on the distilled model of {lora} (its trials sample this): "
                     f"[{low}, {high}]{per_value}")
    return lines


def format_duration(seconds: float) -> str:
    """'<1 s', '42 s', '38 min' or '2.5 h'."""
    if seconds < 0.5:
        return "<1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


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


def format_setting(setting: dict, shown: dict | None = None) -> str:
    """'deepcache(cache_interval=3, cache_branch_id=0) + tome(ratio=0.5)'. `shown`: the
    parameters to name per family (a log line's: those the study searches); a family with none
    named there is shown whole; a name left empty (distill's weight_name) is left out."""
    parts = []
    for name, params in setting.items():
        keep = [k for k in (shown or {}).get(name, []) if k in params] \
            or [k for k, value in params.items() if value != ""]
        values = ", ".join(f"{k}={_cell(params[k])}" for k in keep)
        parts.append(f"{name}({values})")
    return " + ".join(parts) or "baseline"


def format_interval(interval: Interval | dict | None, digits: int = 3) -> str:
    """'0.120 [0.050, 0.190]' from an Interval or {'mean', 'low', 'high'}; '-' for a missing bound."""
    if isinstance(interval, Interval):
        interval = interval.to_dict()
    if not interval or interval.get("mean") is None:
        return "-"

    def bound(value) -> str:
        return "-" if value is None or abs(value) == float("inf") else f"{value:.{digits}f}"

    return f"{interval['mean']:.{digits}f} [{bound(interval.get('low'))}, {bound(interval.get('high'))}]"


TOO_WIDE = 4.0  # an interval whose ends lie further apart than this ratio tells nothing yet


def too_wide(low: float, high: float) -> bool:
    """Do an interval's ends lie too far apart (or at zero) to tell anything yet?"""
    return low <= 0 or high / low > TOO_WIDE


def format_speedup(figures: dict) -> str:
    """'2.10 [1.95, 2.27]' from a dict with speedup, speedup_low and speedup_high; an interval
    wider than TOO_WIDE (e.g. [0.00, 159.12] from two noisy batches) is said in words, and so is
    none at all (one timed batch a side)."""
    if figures.get("speedup") is None:
        return "-"
    low, high = figures.get("speedup_low"), figures.get("speedup_high")
    if low is None or high is None:
        return f"{figures['speedup']:.2f} (one batch: no interval)"
    if too_wide(low, high):
        return f"{figures['speedup']:.2f} (not measured enough to tell)"
    return format_interval({"mean": figures["speedup"], "low": low, "high": high}, digits=2)


def compile_text(figures: dict, strong: str = "") -> str | None:
    """What compiling cost a measurement, in words (None when eager); `strong` marks what a
    server would suffer from (the dashboard note: "**")."""
    if not figures.get("compiled"):
        return None
    flags = []
    if figures.get("graph_breaks"):
        flags.append(f"{strong}{figures['graph_breaks']} graph breaks{strong} (a hook torch cannot "
                     "trace)")
    if figures.get("compiled_while_timed"):
        flags.append(f"{strong}{figures['compiled_while_timed']} graphs compiled inside timed "
                     f"batches{strong} (their seconds are in the speedup: it recompiles as it runs)")
    return (f"compiled ({figures['compiled']}): {figures.get('graphs_compiled')} graphs in the "
            f"untimed warm-up ({figures.get('compile_seconds') or 0:.1f} s, not in the speedup)"
            + ("; " + "; ".join(flags) if flags else "; no graph breaks"))


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
    if summary.get("frames", 1) > 1:  # a video: per video and per frame, and its frame figures
        headers[1:2] = ["s/video", "s/frame"]
        frames = summary["frames"]
        rows[0][2:2] = [summary["baseline_seconds_per_image"] / frames]
        rows[1][2:2] = [summary["seconds_per_frame"]]
        headers += ["worst-frame PSNR", "temporal change"]
        rows[0] += ["-", "-"]
        rows[1] += [format_interval(summary["psnr_worst_frame"], 2),
                    format_interval(summary["temporal_change"])]
    return table(headers, rows)
