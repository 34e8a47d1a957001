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


def comparison_table(summary: dict) -> str:
    """Baseline vs one setting: seconds per image, speedup, CLIP, loss with CI, PSNR, SSIM."""
    loss = summary["clip_loss"]
    rows = [
        ["baseline", summary["baseline_seconds_per_image"], 1.0, summary["baseline_clip_mean"],
         "-", "-", "-"],
        [summary["combo"], summary["seconds_per_image"], summary["speedup"], summary["clip_mean"],
         f"{loss['mean']:.3f} [{loss['low']:.3f}, {loss['high']:.3f}]",
         summary["psnr"]["mean"], summary["ssim"]["mean"]],
    ]
    headers = ["setting", "s/image", "speedup", "CLIP", "CLIP loss [95% CI]", "PSNR dB", "SSIM"]
    return table(headers, rows)
