"""Pyramid Attention Broadcast (in diffusers as `PyramidAttentionBroadcastConfig`): inside a
timestep window, compute each self-attention only every `spatial_attention_block_skip_range`
steps and broadcast its output to the steps between.

On diffusion transformers it goes through the model's `enable_cache`. The SD UNet has no
`enable_cache`, but its self-attention layers (`...transformer_blocks.N.attn1`) are diffusers
`Attention` modules, so the same hook applies there directly; the test suite checks that it
changes the images. The current timestep comes from the pipeline when it tracks one (FLUX),
otherwise from a forward pre-hook on the UNet that reads the timestep of each call.

The window and the skip range only decide at which denoiser calls the attention is broadcast, so
settings that broadcast at the same calls are one computation: the timestep of each call is
measured once per device (`measure_timesteps`) and a setting is known by the calls it broadcasts
at (`computation`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from optsearch.accelerators.base import Param, as_list
from optsearch.accelerators.calls import call_parameters, runs_separate_cfg
from optsearch.accelerators.hooks import HookPatch, denoiser, denoisers

NAME = "pab"
SAME_COMPUTATION = "same attention broadcast"  # what a copied twin's record says
DEFAULTS = {"spatial_attention_block_skip_range": 2, "timestep_skip_low": 100, "timestep_skip_high": 800}
APPLIES_TO = ("unet", "transformer", "video")
PARAMS = (
    Param("spatial_attention_block_skip_range", int, (2, 6), minimum=2,
          help="self-attention computed every N steps inside the window"),
    Param("timestep_skip_low", int, (100,), minimum=0, maximum=1000,
          help="the window's lower timestep (0-1000 scale; noise is high at 1000)"),
    Param("timestep_skip_high", int, (600, 1000), minimum=0, maximum=1000, grid_step=100,
          help="the window's upper timestep"),
)


class _TimestepProbe:
    """The timestep of the denoiser's latest call, read by a forward pre-hook, on the 0-1000
    scale: FLUX's image-to-image, Fill and inpainting loops pass it divided by 1000 (and track no
    current timestep), which the scheduler's own timesteps tell at the first call."""

    def __init__(self, module, scheduler=None):
        self.value = 1000
        self.scale: float | None = None  # 1000 where the denoiser gets timestep / 1000
        self.scheduler = scheduler
        self.handle = module.register_forward_pre_hook(self._read, with_kwargs=True)

    def _read(self, module, args, kwargs) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if timestep is not None:
            value = _as_float(timestep)
            if self.scale is None:
                self.scale = _scale_of(value, getattr(self.scheduler, "timesteps", None))
            self.value = value * self.scale

    def __call__(self) -> float:
        return self.value


def _as_float(timestep) -> float:
    return float(timestep.flatten()[0]) if hasattr(timestep, "flatten") else float(timestep)


def _scale_of(value: float, timesteps) -> float:
    """1000 when `value` is one of the scheduler's timesteps divided by 1000 (to within bf16's
    precision) and not one itself, else 1."""
    if timesteps is None or len(timesteps) == 0 or value <= 0:
        return 1.0
    nearest = min(abs(float(t) - value) for t in timesteps)
    scaled = min(abs(float(t) - 1000 * value) for t in timesteps)
    return 1000.0 if scaled <= 0.01 * 1000 * value and nearest > 0.01 * max(value, 1.0) else 1.0


def _timestep_source(pipe, module) -> tuple[Callable[[], float], _TimestepProbe | None]:
    """What PAB reads as the current timestep: the pipeline's own when it tracks one (FLUX: on
    the 0-1000 scale, where its transformer gets it divided by 1000), else a probe's reading of
    the denoiser's calls (to remove with the patch)."""
    if hasattr(type(pipe), "current_timestep"):
        return (lambda: pipe.current_timestep), None
    probe = _TimestepProbe(module, getattr(pipe, "scheduler", None))
    return probe, probe


class BroadcastPatch:
    """PAB's hooks, with the share of the attention calls that ran: counted by HookPatch on an
    eager denoiser; on a compiled one (where counting would change what is compiled) told by the
    measured timesteps (`computation`: every hooked attention decides alike at a call), for a
    call of the step count they were measured at."""

    def __init__(self, patch: HookPatch, params: Mapping, measured: Mapping):
        self.patch, self.params, self.measured = patch, dict(params), dict(measured)
        self.steps: int | None = None

    def prepare(self, call_kwargs: dict) -> None:
        if problem := call_problem(self.patch.pipe, call_kwargs):
            raise ValueError(problem)
        self.steps = call_kwargs.get("num_inference_steps")
        self.patch.prepare(call_kwargs)

    def computed_fraction(self) -> float | None:
        return self.patch.computed_fraction(told=self._told_fraction)

    def _told_fraction(self) -> float | None:
        told = computation(self.params, self.steps, self.measured)
        return None if told is None else 1 - len(told["broadcast_calls"]) / len(self.measured["timesteps"])

    def restore(self) -> None:
        self.patch.restore()


def call_problem(pipe, call_kwargs: Mapping) -> str | None:
    """diffusers' PAB keeps one cache per attention layer for all the calls of a step. Where
    guidance runs as separate transformer calls whose prompts differ in length (Qwen-Image's true
    CFG: each prompt's embeddings are cut to its own tokens), the unconditional call is handed the
    conditional one's cached output and fails ("The size of tensor a ... must match"), measured
    on builtin:tiny-qwen-image. Where both calls have one length (Wan, FLUX pad their prompts),
    it broadcasts across them, as diffusers does when served, and the metric measures that."""
    if "prompt_embeds_mask" in call_parameters(pipe) and runs_separate_cfg(pipe, call_kwargs):
        return (f"pab keeps one attention cache for both guidance calls of a step, and "
                f"{type(pipe).__name__}'s true CFG gives them prompts of different lengths "
                "(diffusers fails at the first broadcast): leave pab out, or set "
                "model.true_cfg_scale = 1")
    return None


def window_problem(low, high) -> str | None:
    """PAB broadcasts between two timesteps: every `timestep_skip_low` must lie below every
    `timestep_skip_high` (each one value, or the [low, high] a study searches), or the window is
    empty and diffusers' hook would run on nothing."""
    lows, highs = as_list(low), as_list(high)
    if max(lows) < min(highs):
        return None
    return (f"pab.timestep_skip_low ({_said(lows)}) must lie below pab.timestep_skip_high "
            f"({_said(highs)}): every value of the first below every value of the second")


def _said(values: list) -> str:
    return str(values[0]) if len(values) == 1 else f"{min(values)}..{max(values)}"


def apply(pipe, spatial_attention_block_skip_range: int = DEFAULTS["spatial_attention_block_skip_range"],
          timestep_skip_low: int = DEFAULTS["timestep_skip_low"],
          timestep_skip_high: int = DEFAULTS["timestep_skip_high"], **measured) -> BroadcastPatch:
    """`measured`: the timesteps `measure_timesteps` found, which change nothing PAB does (they
    tell what ran on a compiled denoiser)."""
    from diffusers import PyramidAttentionBroadcastConfig
    from diffusers.hooks import HookRegistry, apply_pyramid_attention_broadcast
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

    if problem := window_problem(timestep_skip_low, timestep_skip_high):
        raise ValueError(problem)
    module = denoiser(pipe)
    current_timestep, probe = _timestep_source(pipe, module)
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=int(spatial_attention_block_skip_range),
        spatial_attention_timestep_skip_range=(int(timestep_skip_low), int(timestep_skip_high)),
        current_timestep_callback=current_timestep,
    )

    def enable(target) -> None:
        if hasattr(target, "enable_cache"):
            target.enable_cache(config)
        else:
            apply_pyramid_attention_broadcast(target, config)

    def disable(target) -> None:
        if probe is not None:
            probe.handle.remove()
        if hasattr(target, "disable_cache"):
            target.disable_cache()
        else:
            registry = HookRegistry.check_if_exists_or_initialize(target)
            registry.remove_hook(_PYRAMID_ATTENTION_BROADCAST_HOOK, recurse=True)

    params = dict(spatial_attention_block_skip_range=spatial_attention_block_skip_range,
                  timestep_skip_low=timestep_skip_low, timestep_skip_high=timestep_skip_high)
    try:
        return BroadcastPatch(HookPatch(pipe, enable, disable), params, measured)
    except BaseException:
        if probe is not None:
            probe.handle.remove()
        raise


def measure_timesteps(pipe, steps: int, run_once: Callable[[], object]) -> dict:
    """The timestep PAB reads at each denoiser call of one plain call `run_once()` of `steps`
    steps: {"timesteps": [...], "step_count": steps}. Measured eagerly (a compiled denoiser is not
    recompiled for the hook)."""
    import torch

    module = denoiser(pipe)
    current, probe = _timestep_source(pipe, module)
    seen: list[float] = []
    experts: list[int] = []  # which denoiser each call ran (Wan 2.2 A14B: two, in turn)

    def record(index: int) -> None:
        seen.append(_as_float(current()))
        experts.append(index)

    handles = [model.register_forward_pre_hook(  # after the probe's own hook
        lambda *_, index=index: record(index), with_kwargs=True)
        for index, model in enumerate(denoisers(pipe))]
    try:
        with torch.compiler.set_stance("force_eager"):
            run_once()
    finally:
        for handle in handles:
            handle.remove()
        if probe is not None:
            probe.handle.remove()
    measured = {"timesteps": seen, "step_count": steps}
    return {**measured, "experts": experts} if any(experts) else measured


def expert_calls(calibration: Mapping) -> list[tuple[int, float]]:
    """(the call's index among its own denoiser's calls, its timestep) for each measured call: a
    cache's hooks count the calls of the denoiser they sit on, so on Wan 2.2's second expert the
    count starts again at 0 (one expert: the call's own index)."""
    experts = calibration.get("experts") or [0] * len(calibration["timesteps"])
    seen: dict[int, int] = {}
    calls = []
    for expert, timestep in zip(experts, calibration["timesteps"], strict=True):
        calls.append((seen.get(expert, 0), timestep))
        seen[expert] = seen.get(expert, 0) + 1
    return calls


def computation(params: Mapping, steps: int, calibration: Mapping) -> dict | None:
    """What a setting computes in a call of `steps` steps, told by the measured timesteps (None
    without them, or when they were measured at another step count): the denoiser calls whose
    attention is broadcast rather than computed. diffusers computes at a call outside the window
    (`low < timestep < high`), at the first call and at every `skip range`-th (the hooks' state
    starts afresh with each pipeline call; each expert's hooks count their own calls), and
    broadcasts at the others; settings that broadcast at the same calls compute the same,
    whatever their window or skip range."""
    if calibration.get("step_count") != steps or not calibration.get("timesteps"):
        return None
    drawn = {**DEFAULTS, **params}
    low, high = float(drawn["timestep_skip_low"]), float(drawn["timestep_skip_high"])
    every = int(drawn["spatial_attention_block_skip_range"])
    return {"broadcast_calls": [call for call, (own, timestep) in enumerate(expert_calls(calibration))
                                if low < timestep < high and own > 0 and own % every != 0]}


def warmup_steps(spatial_attention_block_skip_range: int = 2, **_) -> int:
    return int(spatial_attention_block_skip_range) + 1
