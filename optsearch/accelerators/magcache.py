"""MagCache (in diffusers as `MagCacheConfig`): skip the transformer blocks while the accumulated
error predicted from the model's *magnitude ratios* (how the residual's norm changes from step to
step) stays under `threshold`, at most `max_skip_steps` steps in a row, never in the first
`retention_ratio` of the steps.

The ratios belong to a checkpoint (and scheduler): `measure` measures them with one plain
call, the way diffusers documents (`calibrate=True` prints them). The worker calibrates once per
study and device fingerprint and stores them in the study, so every worker uses the same ones.

Which steps a setting skips follows from the ratios alone, not from the images: `skipped_steps`
replays diffusers' decision. So an "auto" threshold range needs no call beyond the ratios': a trial
samples from the threshold that skips its first step to the one past which its `max_skip_steps`,
`retention_ratio` and step count allow no more skips (`range_for`). Outside it a threshold skips
nothing, or repeats the saturated computation of every threshold above it.

Wan 2.2 A14B runs two experts in turn: `transformer` for the steps at or above its boundary
timestep, `transformer_2` for the rest. Each has its own ratios, and a server enables MagCache on
each with the steps that expert runs (`num_inference_steps`), so its retention and interpolation
count that expert's steps. The calibration holds both experts' ratios and, for every step count up
to the model's, how many steps the first expert runs (`first_expert_steps`, from the scheduler and
the boundary): what a call of any step count skips is still told by the ratios alone.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Mapping, Sequence

from optsearch.accelerators.base import Param, bounds_of
from optsearch.accelerators.hooks import (
    HookPatch,
    cache_patch,
    call_steps,
    denoisers,
    first_expert_steps,
    unregistered_block_problem,
)

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


def problem_with(pipe, values: Mapping | None = None) -> str | None:
    """diffusers' MagCache needs its blocks registered (`unregistered_block_problem`). Two experts
    are split by the pipeline's boundary; without one the second never runs."""
    if problem := unregistered_block_problem(NAME, pipe):
        return problem
    if getattr(pipe, "transformer_2", None) is not None \
            and getattr(getattr(pipe, "config", None), "boundary_ratio", None) is None:
        return ("magcache calibrates each expert over the steps it runs; this pipeline has a "
                "second expert (transformer_2) but no boundary_ratio to split the steps by")
    return None


def expert_shares(calibration: Mapping, steps: int) -> list[tuple[list[float], int]]:
    """(each expert's ratios, the steps it runs) in a call of `steps` steps: one transformer runs
    them all; Wan 2.2 A14B's first expert the high-noise ones, its second the rest."""
    ratios, second = list(calibration["mag_ratios"]), calibration.get("mag_ratios_2")
    if not second:
        return [(ratios, steps)]
    table = calibration["first_expert_steps"]
    if not 1 <= steps <= len(table):
        raise ValueError(f"magcache: the experts' split was measured for 1 to {len(table)} steps, "
                         f"not {steps}")
    return [(ratios, table[steps - 1]), (list(second), steps - table[steps - 1])]


def model_steps(calibration: Mapping) -> int:
    """The step count the ratios were measured at (both experts' together)."""
    return len(calibration["mag_ratios"]) + len(calibration.get("mag_ratios_2") or [])


class MagCachePatch:
    """MagCache whose config follows each call's step count (the ratios are interpolated), on
    each expert with its own ratios over its own steps."""

    def __init__(self, pipe, threshold: float, max_skip_steps: int, retention_ratio: float,
                 calibration: Mapping):
        self.pipe, self.calibration = pipe, calibration
        self.options = dict(threshold=threshold, max_skip_steps=max_skip_steps,
                            retention_ratio=retention_ratio)
        self.steps = model_steps(calibration)
        self.strength = None  # the last call's, where image-to-image
        self.patch = self._enable(self.steps)

    def _enable(self, steps: int) -> HookPatch:
        from diffusers import MagCacheConfig

        split = self.calibration.get("first_expert_steps")
        if split is not None and steps > len(split):  # served at more steps than measured
            self.calibration = {**self.calibration,
                                "first_expert_steps": first_expert_steps(self.pipe, steps)}
        # an expert that runs no step of this call keeps a 1-step config it never reaches
        return cache_patch(self.pipe, [MagCacheConfig(num_inference_steps=max(1, count),
                                                      mag_ratios=ratios, **self.options)
                                       for ratios, count in expert_shares(self.calibration, steps)],
                           NAME)

    def computed_fraction(self) -> float | None:
        """MagCache skips every block of a skipped step: the share of its hooked blocks' calls
        that ran is the share of steps that computed, counted by HookPatch on an eager denoiser
        and, on a compiled one (where counting would change what is compiled), told by the
        replay of diffusers' decision on the ratios (`skipped_steps`, exact: tested)."""
        return self.patch.computed_fraction(told=self._replayed_fraction)

    def _replayed_fraction(self) -> float:
        return 1 - len(call_skips(self.calibration, self.steps, self.options)) / self.steps

    def prepare(self, call_kwargs: dict) -> None:
        self.strength = call_kwargs.get("strength")
        steps = call_steps(self.pipe, call_kwargs, self.steps)  # at a strength: its share
        if steps != self.steps:
            self.patch.restore()
            self.patch = self._enable(steps)
            self.steps = steps
        self.patch.prepare(call_kwargs)

    def ran_with(self) -> dict:
        """The steps the config counted, where an image-to-image call denoised a share of its
        steps (the pipeline's rounding: what a deployment sets as num_inference_steps)."""
        return {"denoising_steps": self.steps} if self.strength is not None else {}

    def restore(self) -> None:
        self.patch.restore()


def apply(pipe, threshold: float = DEFAULTS["threshold"],
          max_skip_steps: int = DEFAULTS["max_skip_steps"],
          retention_ratio: float = DEFAULTS["retention_ratio"],
          mag_ratios: Sequence[float] | None = None, **calibrated) -> MagCachePatch:
    """`calibrated`: the rest of what `measure` stored (on two experts, "mag_ratios_2" and
    "first_expert_steps"), and the ranges, unused here."""
    if not mag_ratios:
        raise ValueError("magcache needs the model's magnitude ratios: calibrate them first "
                         "(optsearch does this once per study and device)")
    second = calibrated.get("mag_ratios_2")
    if len(denoisers(pipe)) != (2 if second else 1):
        measured, runs = ("two experts", "one transformer") if second else \
            ("one transformer", "two experts (transformer_2)")
        raise ValueError(f"magcache: the ratios were measured on {measured}; this pipeline runs "
                         f"{runs}: calibrate on it")
    calibration = {"mag_ratios": list(mag_ratios)}
    if second:
        calibration.update(mag_ratios_2=list(second), first_expert_steps=calibrated.get(
            "first_expert_steps") or first_expert_steps(pipe, len(mag_ratios) + len(second)))
    return MagCachePatch(pipe, float(threshold), int(max_skip_steps), float(retention_ratio),
                         calibration)


def measure(pipe, steps: int, run_once: Callable[[], object]) -> dict:
    """The magnitude ratios of `pipe` over `steps` steps, from one plain call `run_once()` (one:
    on two experts, which printed list is whose is told by the order of one call's lists):
    {"mag_ratios": [...]}, and on two experts each one's over the steps it runs
    ("mag_ratios_2", and "first_expert_steps" for every step count up to `steps`)."""
    from diffusers import MagCacheConfig

    split = first_expert_steps(pipe, steps) if len(denoisers(pipe)) == 2 else None
    counts = [steps] if split is None else [split[steps - 1], steps - split[steps - 1]]
    if 0 in counts:
        raise RuntimeError(f"magcache: at {steps} steps one of the two experts runs no step "
                           "(the pipeline's boundary_ratio): its ratios cannot be measured")
    patch = cache_patch(pipe, [MagCacheConfig(num_inference_steps=count, calibrate=True)
                               for count in counts], NAME)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            run_once()
    finally:
        patch.restore()
    lists = [[float(r) for r in line.strip("[] ").split(",")]  # float() reads a "nan" ratio too
             for line in printed.getvalue().splitlines()
             if line.startswith("[") and not line.startswith("[MagCache]")]
    if not lists:
        raise RuntimeError("MagCache calibration printed no ratios (the denoiser has no "
                           "transformer blocks diffusers recognises)")
    # each expert prints once per cache context (guidance: "cond" and "uncond") at its last
    # step, and the first expert's steps all come before the second's: the last of each half
    per_expert = len(lists) // len(counts)
    ratios = [lists[(index + 1) * per_expert - 1] for index in range(len(counts))]
    if [len(r) for r in ratios] != counts:
        raise RuntimeError(f"MagCache calibration printed ratios over {[len(r) for r in lists]} "
                           f"steps where the experts run {counts}")
    if split is None:
        return {"mag_ratios": ratios[0]}
    return {"mag_ratios": ratios[0], "mag_ratios_2": ratios[1], "first_expert_steps": split}


def skipped_steps(mag_ratios: Sequence[float], steps: int, threshold: float, max_skip_steps: int,
                  retention_ratio: float) -> tuple[list[int], list[float]]:
    """(the steps a call of `steps` steps skips, the accumulated error at each): diffusers'
    MagCacheHeadHook decision replayed on one network's ratios, with no model call."""
    return _replay(_ratios_at(mag_ratios, steps), threshold, max_skip_steps, retention_ratio)


def call_skips(calibration: Mapping, steps: int, params: Mapping) -> list[int]:
    """The steps of a whole call a setting skips: each expert's decision on its own ratios over
    its own steps, numbered as the call runs them."""
    drawn, skipped, first = {**DEFAULTS, **params}, [], 0
    for ratios, count in expert_shares(calibration, steps):
        if count:
            skipped += [first + step for step in skipped_steps(
                ratios, count, float(drawn["threshold"]), int(drawn["max_skip_steps"]),
                float(drawn["retention_ratio"]))[0]]
        first += count
    return skipped


def call_bounds(calibration: Mapping, steps: int, max_skip_steps: int,
                retention_ratio: float) -> list[float] | None:
    """`threshold_bounds` of a whole call: from the least threshold that skips a step of either
    expert to the least past which neither skips more."""
    return _union([threshold_bounds(ratios, count, max_skip_steps, retention_ratio)
                   for ratios, count in expert_shares(calibration, steps) if count])


def _union(bounds: Sequence[list[float] | None]) -> list[float] | None:
    """The range spanning every given one (None: no step to skip there); None when none is."""
    given = [b for b in bounds if b is not None]
    return [min(b[0] for b in given), max(b[1] for b in given)] if given else None


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
    measured = measure(pipe, steps, run_once)
    retentions = searched.get("retention_ratio", [DEFAULTS["retention_ratio"]])
    by_skips = {}
    for skips in searched.get("max_skip_steps", [DEFAULTS["max_skip_steps"]]):
        bounds = _union([call_bounds(measured, steps, int(skips), float(r)) for r in retentions])
        if bounds:
            by_skips[str(int(skips))] = bounds
    if not by_skips:  # the retention searched leaves no step to skip: every threshold is inert
        return {**measured, "auto": {"threshold": [0.0, 0.0]}}
    lows, highs = zip(*by_skips.values(), strict=True)
    return {**measured, "auto": {"threshold": [min(lows), max(highs)]},
            "by": {"threshold": ["max_skip_steps", by_skips]}}


def computation(params: Mapping, steps: int, calibration: Mapping) -> dict | None:
    """What a setting computes in a call of `steps` steps: the steps it skips, told by the stored
    ratios alone (None without them). Two settings that skip the same steps compute the same."""
    if not calibration.get("mag_ratios"):
        return None
    return {"skipped_steps": call_skips(calibration, steps, params)}


def range_for(calibration: Mapping, values: Mapping, steps: int | None) -> list[float] | None:
    """The threshold range of one trial, whose `max_skip_steps` and `retention_ratio` are drawn
    (`values`) and which runs `steps` steps (None: the model's, those the ratios were measured
    at): exact, since the skips follow from the stored ratios alone."""
    drawn = {**DEFAULTS, **values}
    return call_bounds(calibration, steps or model_steps(calibration), int(drawn["max_skip_steps"]),
                       float(drawn["retention_ratio"]))


def warmup_steps(max_skip_steps: int = DEFAULTS["max_skip_steps"], **_) -> int:
    return 3 + int(max_skip_steps)
