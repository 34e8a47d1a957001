"""Fewer steps: run the setting with `num_inference_steps` below the model's, the reference line
every other setting must beat ("DeepCache at 50 steps" is worth nothing if plain 25 steps is as
good and as fast).

Nothing on the pipeline changes: the patch only lowers the step count of each call (`prepare`).
A shorter call (the untimed warm-up) keeps its own, smaller count.
"""

from __future__ import annotations

import math

from optsearch.accelerators.base import Param
from optsearch.accelerators.calls import call_steps

NAME = "steps"
APPLIES_TO = ("unet", "transformer", "video")
PARAMS = (
    Param("num_inference_steps", int, (0.25, 1.0), minimum=1, scales_with_steps=True,
          help="denoising steps of the setting (default range: a quarter of model.steps to all)"),
)


class StepsPatch:
    """Caps every call's `num_inference_steps` at the setting's."""

    def __init__(self, pipe, num_inference_steps: int):
        self.pipe, self.num_inference_steps = pipe, num_inference_steps
        self.fraction: float | None = None  # of the last call's requested steps, run

    def prepare(self, call_kwargs: dict) -> None:
        """Cap the call's steps; the share run counts the steps that denoise (image-to-image:
        the pipeline's share of each count)."""
        requested = dict(call_kwargs)
        call_kwargs["num_inference_steps"] = min(
            requested.get("num_inference_steps", self.num_inference_steps), self.num_inference_steps)
        self.fraction = call_steps(self.pipe, call_kwargs) / max(1, call_steps(
            self.pipe, requested, self.num_inference_steps))

    def computed_fraction(self) -> float | None:
        return self.fraction

    def restore(self) -> None:
        """Nothing was changed on the pipeline."""


def apply(pipe, num_inference_steps: int = 25) -> StepsPatch:
    return StepsPatch(pipe, int(num_inference_steps))


def max_speedup(model_steps: int, num_inference_steps: int = 25, strength: float | None = None,
                **_) -> float:
    """Fewer steps cannot save more than the steps it drops (the VAE and text encoder stay). At
    an image-to-image strength the steps that denoise are its share of each count, rounded either
    way by diffusers' pipelines: the bound takes the model's rounded up and the trial's down."""
    fewer = min(int(num_inference_steps), model_steps)
    if strength is None:
        return model_steps / fewer
    return min(math.ceil(model_steps * strength), model_steps) / max(1, int(fewer * strength))


def warmup_steps(**_) -> int:
    return 0
