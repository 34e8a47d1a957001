"""MagCache (in diffusers as `MagCacheConfig`): skip the transformer blocks while the accumulated
error predicted from the model's *magnitude ratios* (how the residual's norm changes from step to
step) stays under `threshold`, at most `max_skip_steps` steps in a row, never in the first
`retention_ratio` of the steps.

The ratios belong to a checkpoint (and scheduler): `measure_ratios` measures them with one plain
call, the way diffusers documents (`calibrate=True` prints them). The worker calibrates once per
study and device fingerprint and stores them in the study, so every worker uses the same ones.

Which steps a setting skips follows from the ratios alone, not from the images: `skipped_steps`
replays diffusers' decision. So an "auto" threshold range needs no call beyond the ratios': a trial
samples from the threshold that skips its first step to the one past which its `max_skip_steps`,
`retention_ratio` and step count allow no more skips (`range_for`). Outside it a threshold skips
nothing, or repeats the saturated computation of every threshold above it.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
from collections.abc import Callable, Mapping, Sequence

from optsearch.accelerators.base import Param, bounds_of
from optsearch.accelerators.hooks import HookPatch, cache_patch

NAME = "magcache"
SAME_COMPUTATION = "same steps skipped"  # what a copied twin's record says
APPLIES_TO = ("transformer", "video")
RANGE_AT_ANY_STEPS = True  # range_for interpolates the ratios: no calibration at fewer steps
DEFAULTS = {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2}  # diffusers' (the paper's)
PARAMS = (  # the threshold last: its "auto" range follows the other two as drawn
    Param("max_skip_steps", int, (1, 6), minimum=1, help="most steps skipped in a row"),
    Param("retention_ratio", float, (0.1, 0.5), minimum=0.0, maximum=1.0, exclusive_maximum=True,
          grid_step=0.1, help="share of the first steps never skipped"),
    Param("threshold", float, (0.02, 0.5), minimum=0.0, grid_step=0.02, calibrated=True,
          help="accumulated error under which blocks are skipped"),
)


def problem_with(pipe) -> str | None:
    """MagCache's ratios belong to one network; Wan 2.2 A14B runs two experts in turn, each with
    its own (not measured here yet)."""
    if getattr(pipe, "transformer_2", None) is not None:
        return ("magcache measures one transformer's magnitude ratios; this pipeline runs two "
                "experts (transformer_2): search the other caches on it")
    return None


class MagCachePatch:
    """MagCache whose config follows each call's step count (the ratios are interpolated)."""

    def __init__(self, pipe, threshold: float, max_skip_steps: int, retention_ratio: float,
                 mag_ratios: Sequence[float]):
        self.pipe = pipe
        self.options = dict(threshold=threshold, max_skip_steps=max_skip_steps,
                            retention_ratio=retention_ratio, mag_ratios=list(mag_ratios))
        self.steps = len(mag_ratios)
        self.patch = self._enable(self.steps)

    def _enable(self, steps: int) -> HookPatch:
        from diffusers import MagCacheConfig

        return cache_patch(self.pipe, MagCacheConfig(num_inference_steps=steps, **self.options),
                           NAME)

    def computed_fraction(self) -> float | None:
        """MagCache skips every block of a skipped step: the share of its hooked blocks' calls
        that ran is the share of steps that computed, counted by HookPatch on an eager denoiser
        and, on a compiled one (where counting would change what is compiled), told by the
        replay of diffusers' decision on the ratios (`skipped_steps`, exact: tested)."""
        return self.patch.computed_fraction(told=self._replayed_fraction)

    def _replayed_fraction(self) -> float:
        skipped, _ = skipped_steps(self.options["mag_ratios"], self.steps, self.options["threshold"],
                                   self.options["max_skip_steps"], self.options["retention_ratio"])
        return 1 - len(skipped) / self.steps

    def prepare(self, call_kwargs: dict) -> None:
        steps = call_kwargs.get("num_inference_steps", self.steps)
        if steps != self.steps:
            self.patch.restore()
            self.patch = self._enable(steps)
            self.steps = steps
        self.patch.prepare(call_kwargs)

    def restore(self) -> None:
        self.patch.restore()


def apply(pipe, threshold: float = DEFAULTS["threshold"],
          max_skip_steps: int = DEFAULTS["max_skip_steps"],
          retention_ratio: float = DEFAULTS["retention_ratio"],
          mag_ratios: Sequence[float] | None = None, **_calibrated) -> MagCachePatch:
    if not mag_ratios:
        raise ValueError("magcache needs the model's magnitude ratios: calibrate them first "
                         "(optsearch does this once per study and device)")
    return MagCachePatch(pipe, float(threshold), int(max_skip_steps), float(retention_ratio),
                         mag_ratios)


def measure_ratios(pipe, steps: int, run_once: Callable[[], object]) -> list[float]:
    """The magnitude ratios of `pipe` over `steps` steps, from one plain call `run_once()`."""
    from diffusers import MagCacheConfig

    patch = cache_patch(pipe, MagCacheConfig(num_inference_steps=steps, calibrate=True), NAME)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            run_once()
    finally:
        patch.restore()
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios (the denoiser has no "
                           "transformer blocks diffusers recognises)")
    return [float(r) for r in ast.literal_eval(lists[-1])]


def skipped_steps(mag_ratios: Sequence[float], steps: int, threshold: float, max_skip_steps: int,
                  retention_ratio: float) -> tuple[list[int], list[float]]:
    """(the steps a call of `steps` steps skips, the accumulated error at each): diffusers'
    MagCacheHeadHook decision replayed on the ratios, with no model call."""
    return _replay(_ratios_at(mag_ratios, steps), threshold, max_skip_steps, retention_ratio)


def _replay(ratios, threshold: float, max_skip_steps: int, retention_ratio: float
            ) -> tuple[list[int], list[float]]:
    """`skipped_steps` on ratios already as MagCacheConfig holds them (`_ratios_at`)."""
    steps = len(ratios)
    first = _retention_step(retention_ratio, steps)
    ratio, error, run, computed_before = 1.0, 0.0, 0, False
    skipped, errors = [], []
    for step in range(steps):
        if step >= first:
            ratio, run = ratio * ratios[step], run + 1
            error = error + abs(1.0 - ratio)
            if computed_before and error <= threshold and run <= max_skip_steps:
                skipped.append(step)
                errors.append(float(error))
                continue
            ratio, error, run = 1.0, 0.0, 0
        computed_before = True
    return skipped, errors


def threshold_bounds(mag_ratios: Sequence[float], steps: int, max_skip_steps: int,
                     retention_ratio: float) -> list[float] | None:
    """[the least threshold that skips a step, the least past which nothing more is skipped]
    for a setting's other parameters; None when its retention leaves no step to skip. Under the
    first, every step's own error is above the threshold and each step resets the count; at the
    second, every skip of the saturated run (as many as `max_skip_steps` allows) passes."""
    ratios = _ratios_at(mag_ratios, steps)
    own_errors = [float(abs(1.0 - 1.0 * ratios[step]))
                  for step in range(max(1, _retention_step(retention_ratio, steps)), steps)]
    _, saturated = _replay(ratios, float("inf"), max_skip_steps, retention_ratio)
    own_errors, saturated = ([e for e in errors if math.isfinite(e)]  # a NaN ratio never skips
                             for errors in (own_errors, saturated))
    if not own_errors or not saturated:
        return None
    return bounds_of(min(own_errors), max(saturated))


def _ratios_at(mag_ratios: Sequence[float], steps: int):
    """The ratios as diffusers' MagCacheConfig holds them for `steps` steps: a float32 tensor,
    nearest-interpolated when measured at another step count."""
    import torch
    from diffusers.hooks.mag_cache import nearest_interp

    ratios = torch.tensor(list(mag_ratios))
    return ratios if len(ratios) == steps else nearest_interp(ratios, steps)


def _retention_step(retention_ratio: float, steps: int) -> int:
    """The first step MagCache may skip (diffusers' rounding)."""
    return int(retention_ratio * steps + 0.5)


def calibrate(pipe, run_once: Callable[[], object], searched: Mapping | None = None,
              steps: int | None = None, call_kwargs: Mapping | None = None) -> dict:
    """The ratios from one plain call `run_once()` of `steps` steps, and the "auto" threshold
    ranges they give: per `max_skip_steps` searched (`by`), from the least first-skip threshold
    over the `retention_ratio` values searched to the greatest saturation; "auto" is their union.
    A trial samples in its own range (`range_for`), which these only summarise."""
    searched = searched or {}
    ratios = measure_ratios(pipe, steps, run_once)
    retentions = searched.get("retention_ratio", [DEFAULTS["retention_ratio"]])
    by_skips = {}
    for skips in searched.get("max_skip_steps", [DEFAULTS["max_skip_steps"]]):
        bounds = [b for b in (threshold_bounds(ratios, steps, int(skips), float(r)) for r in retentions)
                  if b is not None]
        if bounds:
            by_skips[str(int(skips))] = [min(b[0] for b in bounds), max(b[1] for b in bounds)]
    if not by_skips:  # the retention searched leaves no step to skip: every threshold is inert
        return {"mag_ratios": ratios, "auto": {"threshold": [0.0, 0.0]}}
    lows, highs = zip(*by_skips.values(), strict=True)
    return {"mag_ratios": ratios, "auto": {"threshold": [min(lows), max(highs)]},
            "by": {"threshold": ["max_skip_steps", by_skips]}}


def computation(params: Mapping, steps: int, calibration: Mapping) -> dict | None:
    """What a setting computes in a call of `steps` steps: the steps it skips, told by the stored
    ratios alone (None without them). Two settings that skip the same steps compute the same."""
    ratios = calibration.get("mag_ratios")
    if not ratios:
        return None
    drawn = {**DEFAULTS, **params}
    return {"skipped_steps": skipped_steps(ratios, steps, float(drawn["threshold"]),
                                           int(drawn["max_skip_steps"]),
                                           float(drawn["retention_ratio"]))[0]}


def range_for(calibration: Mapping, values: Mapping, steps: int | None) -> list[float] | None:
    """The threshold range of one trial, whose `max_skip_steps` and `retention_ratio` are drawn
    (`values`) and which runs `steps` steps (None: the model's, those the ratios were measured
    at): exact, since the skips follow from the stored ratios alone."""
    ratios, drawn = calibration["mag_ratios"], {**DEFAULTS, **values}
    return threshold_bounds(ratios, steps or len(ratios), int(drawn["max_skip_steps"]),
                            float(drawn["retention_ratio"]))


def warmup_steps(max_skip_steps: int = DEFAULTS["max_skip_steps"], **_) -> int:
    return 3 + int(max_skip_steps)
