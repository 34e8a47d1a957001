"""Speedups the setting's computation cannot give: re-timed, never recorded.

Four times fewer steps cannot run more than four times faster, nor a cache that ran 40 % of the
transformer more than 2.5 times faster. A figure beyond what the setting skips
(`accelerators.max_speedup`, or 1 / `compute_fraction` where the families report it, with `SLACK`
for timing noise) means the timing was disturbed,
almost always a baseline timed while something else ran on the device (two CPU workers sharing
cores timed 3.0 and 9.1 s/image for one baseline). The worker then re-times its baseline and
measures the trial once more; still beyond the bound, the trial fails with the reason, so no
impossible figure reaches the study's answer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

from optsearch.accelerators import max_speedup
from optsearch.measure.comparison import Comparison

logger = logging.getLogger(__name__)

SLACK = 1.25  # timing noise on top of the bound before a figure is called impossible


class ImplausibleSpeedup(Exception):
    """A trial measured faster than its computation allows, twice."""


def implausible(result: Comparison, setting: Mapping, model_steps: int,
                strength: float | None = None) -> str | None:
    """Why `result`'s speedup is impossible for `setting`, or None when it is not. The bound is
    what the setting's families allow, or, where they report it, 1 / the share of the denoiser
    they actually ran (`compute_fraction`), whichever is tighter."""
    bounds = [max_speedup(setting, model_steps, strength)]
    if result.compute_fraction:
        bounds.append(1.0 / result.compute_fraction)
    known = [b for b in bounds if b is not None]
    bound = min(known) if known else None
    if bound is None or result.speedup is None or result.speedup <= bound * SLACK:
        return None
    return (f"speedup {result.speedup:.2f}x is beyond the {bound:.2f}x the setting's computation "
            "allows: the timing was disturbed (another process on the device?)")


def with_compiling_of(result: Comparison, first: Comparison) -> Comparison:
    """A measurement repeated on a compiled denoiser finds the setting's graphs compiled by the
    first one: what compiling the setting cost (warm-up seconds, graphs, graph breaks) is the
    first's, plus anything the repeat compiled."""
    if not first.compiled:
        return result
    return dataclasses.replace(
        result, warmup_seconds=first.warmup_seconds + result.warmup_seconds,
        **{name: (getattr(first, name) or 0) + (getattr(result, name) or 0)
           for name in ("graphs_compiled", "compiled_while_timed", "graph_breaks")})


def measure_plausibly(measure: Callable[[], Comparison], retime_baseline: Callable[[], None],
                      setting: Mapping, model, trial) -> Comparison:
    """`measure()` the trial; an impossible figure re-times the baseline and measures again once.
    Twice impossible: the trial records why and fails (ImplausibleSpeedup). `model`: the spec's
    [model] (its steps, and an image-to-image strength)."""
    result = measure()
    reason = implausible(result, setting, model.steps, model.strength)
    if reason is None:
        return result
    logger.warning("trial %d: %s; re-timing the baseline and measuring again", trial.number, reason)
    trial.set_user_attr("retimed_because", reason)
    retime_baseline()
    result = with_compiling_of(measure(), result)
    reason = implausible(result, setting, model.steps, model.strength)
    if reason is None:
        return result
    trial.set_user_attr("fail_reason", reason)
    logger.warning("trial %d failed: %s, again after re-timing", trial.number, reason)
    raise ImplausibleSpeedup(reason)
