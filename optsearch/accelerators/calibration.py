"""What families measure on the device before or beside the search: the "auto" threshold ranges
(`calibrate_family`, stored per device fingerprint, read back as a `CalibratedRange`) and what a
setting computes, where a family can tell it from its calibration alone (`canonical_setting`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from optsearch.accelerators.base import CalibratedRange
from optsearch.accelerators.calls import call_steps
from optsearch.accelerators.registry import REGISTRY, normalize_setting, step_budget


class CalibrationCondition(NamedTuple):
    """One model a family's "auto" range is calibrated on, as its trials run it: `lora`, the
    step-distilled LoRA's files (`distill.lora_key`; None: the plain model), `setting`, the
    distill setting applied for it (None: none), and `step_counts`, the counts it runs
    (`calibrate_family`'s)."""

    lora: str | None
    setting: dict | None
    step_counts: list[int]


def calibrate_family(family: str, pipe, run_once: Callable[[int], object], searched: Mapping,
                     step_counts: Sequence[int], call_kwargs: Mapping | None = None) -> dict:
    """A family's "auto" calibration (its module's `calibrate`) with one plain call
    `run_once(steps)` at each of `step_counts`, the model's first: stored as measured there,
    plus "at_steps" {count: its ranges} when trials also run fewer steps (CalibratedRange).
    `call_kwargs`: what `run_once` passes the pipeline beside its prompts and noise, for a cache
    whose config follows the call (DBCache: whether guidance runs as separate calls), and for the
    steps an image-to-image call denoises at its strength: what the family is told it counts."""
    module = REGISTRY[family]

    def denoising(count: int) -> int:  # an image-to-image call denoises a share of its steps
        return call_steps(pipe, {**(call_kwargs or {}), "num_inference_steps": count})

    measured = module.calibrate(pipe, lambda: run_once(step_counts[0]), searched,
                                denoising(step_counts[0]), call_kwargs)
    if not measured or len(step_counts) < 2:
        return measured
    at_steps = {}
    for count in step_counts:
        at_count = measured if count == step_counts[0] else module.calibrate(
            pipe, lambda count=count: run_once(count), searched, denoising(count), call_kwargs)
        if at_count:  # keyed by the steps that denoise, as a trial's range asks (sampling)
            at_steps[str(denoising(count))] = {key: at_count[key] for key in
                                               ("auto", "by", "diffs", "steps") if key in at_count}
    return {**measured, "at_steps": at_steps}


def missing_conditions(conditions: Sequence[CalibrationCondition], calibration: Mapping
                       ) -> list[CalibrationCondition]:
    """The conditions a family's calibration as stored has not measured: the plain model where
    it holds no "auto", a LoRA where "under" does not name it."""
    return [condition for condition in conditions
            if ("auto" not in calibration if condition.lora is None
                else condition.lora not in calibration.get("under", {}))]


def calibrated_range(family: str, calibration: Mapping, param: str) -> CalibratedRange:
    """The "auto" range of `family.param` in a calibration as stored, with the family's rule for
    each trial's own range where it has one (`range_for`: MagCache's, from its ratios)."""
    return CalibratedRange.stored(calibration, param, getattr(REGISTRY[family], "range_for", None))


def calibration_steps(family: str, model_steps: int, fewest_steps: int | None) -> list[int]:
    """The step counts `calibrate_family` runs: the model's, and the fewest a trial of the family
    runs (`fewest_steps`, when a combo searches it beside `steps`) unless the family's rule gives
    each step count's range from the first calibration alone (`RANGE_AT_ANY_STEPS`: MagCache's
    ratios are interpolated to any count)."""
    if fewest_steps is None or fewest_steps >= model_steps \
            or getattr(REGISTRY[family], "RANGE_AT_ANY_STEPS", False):
        return [model_steps]
    return [model_steps, fewest_steps]


def calibration_cost(family: str, searched: Mapping, step_counts: Sequence[int],
                     model_steps: int | None = None) -> float:
    """What `calibrate_family` runs, in plain calls at the model's steps (`model_steps`, default
    the first count; a call of fewer steps costs its share): a family's module may say how many
    runs it makes (`calibration_runs`)."""
    runs = getattr(REGISTRY[family], "calibration_runs", lambda _searched: 1)(searched)
    return runs * sum(count / (model_steps or step_counts[0]) for count in step_counts)


def canonical_setting(setting: Mapping, model_steps: int, calibration: Mapping[str, dict],
                      denoising: Callable[[int], int] | None = None) -> dict:
    """The setting as the computation it makes: as given, except where a family tells from its
    calibration alone what it computes (its module's `computation`: MagCache's skipped steps from
    its ratios, ToMe's merged token counts from the measured levels); there that stands for its
    parameters, so two settings of one computation (the same images, bit for bit) need one
    measurement. `denoising`: the steps a call of so many steps denoises (image-to-image: the
    loaded pipeline's share, `call_steps`), where not all."""
    try:
        nested = normalize_setting(setting)
    except ValueError:  # a record another version wrote: compared as written
        return dict(setting)
    if nested.get("distill", {}).get("scheduler_config"):  # other timesteps than calibrated
        return nested
    canonical: dict[str, dict] = {}
    for name, params in nested.items():
        tell = getattr(REGISTRY[name], "computation", None)
        steps = step_budget(nested, model_steps)
        computed = tell(params, denoising(steps) if denoising else steps, calibration.get(name) or {}) \
            if tell is not None else None
        canonical[name] = params if computed is None else computed
    return canonical


def same_computation_why(setting: Mapping, other: Mapping) -> str:
    """Why two different settings are one computation, in their families' words ("same tokens
    merged"): what a trial that copies another's result records."""
    try:
        mine, theirs = normalize_setting(setting), normalize_setting(other)
    except ValueError:
        mine, theirs = dict(setting), dict(other)
    words = dict.fromkeys(getattr(REGISTRY.get(name), "SAME_COMPUTATION", "same computation")
                          for name in mine if mine[name] != theirs.get(name))
    return f"{', '.join(words) or 'same computation'}, same device: the same computation"


RANGE_KEYS = ("auto", "by", "at_steps", "observed", "diffs", "steps", "under")  # what only bounds a
# family's search ranges


def calibration_used(setting: Mapping, calibration: Mapping[str, dict]) -> dict:
    """What of the calibration a setting's computation ran with: its families' data beyond their
    ranges (MagCache's ratios). A trial records it, so that its export and its comparison with
    other trials use its own, even where another worker on the device measured and stored others."""
    used = {name: {key: value for key, value in calibration.get(name, {}).items()
                   if key not in RANGE_KEYS} for name in setting}
    return {name: data for name, data in used.items() if data}
