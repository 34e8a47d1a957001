"""MagCache (in diffusers as `MagCacheConfig`): skip the transformer blocks while the accumulated
error predicted from the model's *magnitude ratios* (how the residual's norm changes from step to
step) stays under `threshold`, at most `max_skip_steps` steps in a row, never in the first
`retention_ratio` of the steps.

The ratios belong to a checkpoint (and scheduler): `calibrate` measures them with one plain call,
the way diffusers documents (`calibrate=True` prints them). The worker calibrates once per study
and device fingerprint and stores them in the study, so every worker uses the same ones.
"""

from __future__ import annotations

import ast
import contextlib
import io
from collections.abc import Callable, Sequence

from optsearch.accelerators.base import Param
from optsearch.accelerators.hooks import HookPatch, cache_patch

NAME = "magcache"
APPLIES_TO = ("transformer", "video")
PARAMS = (
    Param("threshold", float, (0.02, 0.5), minimum=0.0, grid_step=0.02,
          help="accumulated error under which blocks are skipped"),
    Param("max_skip_steps", int, (1, 6), minimum=1, help="most steps skipped in a row"),
    Param("retention_ratio", float, (0.1, 0.5), minimum=0.0, maximum=1.0, exclusive_maximum=True,
          grid_step=0.1, help="share of the first steps never skipped"),
)


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
        that ran is the share of steps that computed (counted by HookPatch)."""
        return self.patch.computed_fraction()

    def prepare(self, call_kwargs: dict) -> None:
        steps = call_kwargs.get("num_inference_steps", self.steps)
        if steps != self.steps:
            self.patch.restore()
            self.patch = self._enable(steps)
            self.steps = steps
        self.patch.prepare(call_kwargs)

    def restore(self) -> None:
        self.patch.restore()


def apply(pipe, threshold: float = 0.06, max_skip_steps: int = 3, retention_ratio: float = 0.2,
          mag_ratios: Sequence[float] | None = None) -> MagCachePatch:
    if not mag_ratios:
        raise ValueError("magcache needs the model's magnitude ratios: calibrate them first "
                         "(optsearch does this once per study and device)")
    return MagCachePatch(pipe, float(threshold), int(max_skip_steps), float(retention_ratio),
                         mag_ratios)


def calibrate(pipe, steps: int, run_once: Callable[[], object]) -> list[float]:
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


def warmup_steps(max_skip_steps: int = 3, retention_ratio: float = 0.2, **_) -> int:
    return 3 + int(max_skip_steps)
