"""T-GATE: stop computing cross-attention after `gate_step` steps and reuse its cached output.

T-GATE never undoes itself: its loader adds `pipe.tgate(...)` and every call replaces
`Attention.forward` on each attention module (and leaves a `cache` there). Our restore deletes those
instance attributes, after which the class `forward` is used again. With DeepCache, T-GATE drives
the DeepCache helper itself (`pipe.deepcache`), so DeepCache must be applied first.
"""

from __future__ import annotations

from optsearch.accelerators.base import Param
from optsearch.accelerators.calls import call_parameters

NAME = "tgate"
APPLIES_TO = ("unet",)
PARAMS = (
    # default: a tenth to two fifths of model.steps, T-GATE's 5-20 of 50 at any step count
    Param("gate_step", int, (0.1, 0.4), minimum=1, counts_steps=True, scales_with_steps=True,
          help="steps with cross-attention before it is cached (<= the setting's steps)"),
)

_ADDED_TO_ATTENTION = ("forward", "cache")


def problem_with(pipe, values=None) -> str | None:
    """T-GATE's loaders run their own text-to-image loop in place of the pipeline's call: an
    inpainting or image-to-image call would lose its image (and fail on its strength)."""
    if "image" in call_parameters(pipe):
        return (f"tgate runs its own text-to-image loop in place of {type(pipe).__name__}'s call, "
                "which takes an image (inpainting or image-to-image): leave tgate out")
    return None


class TGatePatch:
    """T-GATE loaded on a pipeline; `__call__` generates through `pipe.tgate`.

    `computed_fraction()` counts the UNet rows the last call ran: after the gate T-GATE drops the
    guidance's unconditional half. The cross-attention it reuses is not counted, so the figure is
    an upper one, and without guidance (no half to drop) it reports nothing.
    """

    def __init__(self, pipe, gate_step: int, deepcache_helper=None):
        from types import MethodType


        self.pipe = pipe
        self.gate_step = gate_step
        if deepcache_helper is not None:
            if hasattr(pipe, "text_encoder_2"):
                from tgate.SDXL_DeepCache import tgate as tgate_call
            else:
                from tgate.SD_DeepCache import tgate as tgate_call
            pipe.deepcache = deepcache_helper
        elif hasattr(pipe, "text_encoder_2"):
            from tgate.SDXL import tgate as tgate_call
        else:
            from tgate.SD import tgate as tgate_call
        pipe.tgate = MethodType(tgate_call, pipe)
        self.rows: list[int] = []  # the UNet's batch rows at each step of the last call
        self._hook = pipe.unet.register_forward_pre_hook(
            lambda _module, args: self.rows.append(int(args[0].shape[0])))

    def computed_fraction(self) -> float | None:
        if not self.rows or min(self.rows) == max(self.rows):
            return None
        return sum(self.rows) / (len(self.rows) * self.rows[0])

    def _clear_attention(self) -> None:
        for module in self.pipe.unet.modules():
            if type(module).__name__ == "Attention":
                for name in _ADDED_TO_ATTENTION:
                    module.__dict__.pop(name, None)

    def __call__(self, *args, **kwargs):
        # A cache left by the previous call (another batch size) must not leak into this one.
        self._clear_attention()
        self.rows = []
        return self.pipe.tgate(*args, gate_step=self.gate_step, **kwargs)

    def restore(self) -> None:
        self._hook.remove()
        self._clear_attention()
        for name in ("tgate", "deepcache"):
            self.pipe.__dict__.pop(name, None)


def apply(pipe, gate_step: int = 10, deepcache_helper=None) -> TGatePatch:
    return TGatePatch(pipe, int(gate_step), deepcache_helper)


def warmup_steps(gate_step: int = 10, **_) -> int:
    """Steps before the gate (cross-attention computed) and one after it (cached)."""
    return int(gate_step) + 1
