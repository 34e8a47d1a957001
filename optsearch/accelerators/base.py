"""The common shape of an accelerator: its parameter space and validation.

Each accelerator module declares its `PARAMS` with this class, the pipeline kinds it
`APPLIES_TO` ("unet", "transformer"), and offers an `apply(pipe, ...)` whose returned patch has
`restore()` (and optionally `prepare(call_kwargs)`, run before every pipeline call). A family that
cannot act on some pipelines of its kind says why in `problem_with(pipe, values)` (`values`: its
parameters' values, a setting's or the study's searched lists). Accelerators know nothing of Optuna.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    """One tunable parameter: its type, the widest range that makes sense, and its default range."""

    name: str
    kind: type  # int, float, bool, or str (one of `choices`)
    default: tuple  # (low, high) searched by default, or (value,) for a fixed value; for a
    # parameter with `choices`, the choices searched by default (one: fixed)
    minimum: float | None = None  # inclusive lower bound of any valid value
    maximum: float | None = None  # inclusive upper bound
    exclusive_maximum: bool = False
    grid_step: float = 1
    help: str = ""
    counts_steps: bool = False  # measured in denoising steps: must fit in the setting's steps
    scales_with_steps: bool = False  # `default` holds fractions of model.steps
    calibrated: bool = False  # a threshold searched in its "auto" range (measured on the device
    # before the search) unless the spec gives a range
    choices: tuple = ()  # the values a str (or bool) parameter takes (searched unordered)
    default_by_kind: tuple[tuple[str, tuple], ...] = ()  # (kind, default) where a pipeline kind
    # ("unet", "transformer", "video") searches another default

    @property
    def named(self) -> bool:
        """Its values are names, searched unordered: its `choices`, or the strings a spec lists
        (distill's LoRA files)."""
        return bool(self.choices) or self.kind is str

    def default_range(self, model_steps: int, kind: str | None = None) -> tuple:
        """The range searched when a spec names none (fractions resolved against model.steps),
        for a pipeline of `kind`."""
        by_kind = dict(self.default_by_kind).get(kind)
        if by_kind is not None:
            return by_kind
        if not self.scales_with_steps:
            return self.default
        return tuple(max(1, round(fraction * model_steps)) for fraction in self.default)

    def check(self, value) -> str | None:
        """Return why `value` is not allowed, or None when it is."""
        if self.kind is bool:
            return None if isinstance(value, bool) else "must be true or false"
        if self.choices:
            return None if value in self.choices else f"must be one of {self.allowed()}"
        if self.kind is str:  # a name the family resolves (distill's LoRA); "" where none is given
            return None if isinstance(value, str) else "must be a string"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a{'n integer' if self.kind is int else ' number'}"
        if not math.isfinite(value):
            return "must be a finite number"
        if self.kind is int and not float(value).is_integer():
            return "must be an integer"
        if self.minimum is not None and value < self.minimum:
            return f"must be >= {self.minimum}"
        if self.maximum is not None:
            if self.exclusive_maximum and value >= self.maximum:
                return f"must be < {self.maximum}"
            if not self.exclusive_maximum and value > self.maximum:
                return f"must be <= {self.maximum}"
        return None

    def allowed(self) -> str:
        """Describe the allowed values, for error messages."""
        if self.kind is bool:
            return "true or false"
        if self.choices:
            return ", ".join(repr(choice) for choice in self.choices)
        if self.kind is str:
            return "a string"
        low = "-inf" if self.minimum is None else self.minimum
        high = "inf" if self.maximum is None else self.maximum
        closing = ")" if self.exclusive_maximum or self.maximum is None else "]"
        return f"{self.kind.__name__} in [{low}, {high}{closing}"


class CalibratedRange(list):
    """[low, high] of an "auto" parameter, measured on the device. Where what it bounds moves
    with another parameter (DBCache's residual differences with Fn), `by` = (that parameter,
    {its value: [low, high]}) and a trial samples within the range of the value it drew. Where
    trials also run fewer steps (a combo with `steps`), the differences grow with the step size:
    `at_steps` = {step count: CalibratedRange} measured at each count calibrated (the model's
    and the fewest searched), and a trial's range is interpolated at the count it drew.
    Where a family can compute each trial's range from what it calibrated (MagCache, from its
    ratios), `rule(values, steps)` gives it exactly, and `by` only summarises. Where trials run
    a step-distilled LoRA, `under` = {its files (`distill.lora_key`): the CalibratedRange
    measured on that distilled model}, and its trials sample in that."""

    def __init__(self, bounds, by: tuple[str, Mapping] | None = None,
                 at_steps: Mapping[int, CalibratedRange] | None = None,
                 rule: Callable[[Mapping, int | None], list | None] | None = None,
                 under: Mapping[str, CalibratedRange] | None = None):
        super().__init__(bounds)
        self.by = by
        self.at_steps = dict(at_steps or {})
        self.rule = rule
        self.under = dict(under or {})

    @classmethod
    def stored(cls, calibration: Mapping, param: str,
               range_for: Callable[[Mapping, Mapping, int | None], list | None] | None = None
               ) -> CalibratedRange:
        """The range of `param` in a family's calibration as `calibrate` returns and the study
        stores it ({"auto": {param: [lo, hi]}, "by": {param: [other, {value: [lo, hi]}]},
        "at_steps": {count: {"auto": ..., "by": ...}}, "under": {LoRA: a calibration as this}});
        `range_for(calibration, values, steps)`: the family's exact rule, where it has one."""
        by = calibration.get("by", {}).get(param)
        at_steps = {int(count): cls.stored(measured, param)
                    for count, measured in calibration.get("at_steps", {}).items()
                    if param in measured.get("auto", {})}
        under = {lora: cls.stored(measured, param, range_for)
                 for lora, measured in calibration.get("under", {}).items()
                 if param in measured.get("auto", {})}
        rule = (lambda values, steps: range_for(calibration, values, steps)) if range_for else None
        return cls(calibration["auto"][param], tuple(by) if by else None, at_steps, rule, under)

    def for_setting(self, values: Mapping, steps: int | None = None, lora: str | None = None) -> list:
        """The range for a setting whose other parameters are drawn already; `steps`: the step
        count it runs (None: the model's), between two calibrated counts a linear blend of
        their ranges; `lora`: the step-distilled LoRA it runs (`distill.lora_key`), whose own
        calibration is used where there is one."""
        if lora in self.under:
            return self.under[lora].for_setting(values, steps)
        if self.rule is not None:
            return self.rule(values, steps) or list(self)
        if steps is None or len(self.at_steps) < 2:
            return self._of(values)
        counts = sorted(self.at_steps)
        below = max((c for c in counts if c <= steps), default=counts[0])
        above = min((c for c in counts if c >= steps), default=counts[-1])
        low_range, high_range = self.at_steps[below]._of(values), self.at_steps[above]._of(values)
        if above == below:  # a count calibrated (or beyond the calibrated ones): as measured
            return low_range
        share = (steps - below) / (above - below)
        return bounds_of(*(a + share * (b - a) for a, b in zip(low_range, high_range, strict=True)))

    def _of(self, values: Mapping) -> list:
        if self.by is None:
            return list(self)
        param, ranges = self.by
        return list(ranges.get(str(values.get(param)), self))


def as_list(value) -> list:
    """A parameter as `problem_with` gets it, as a list: a setting's one value, or the values a
    study searches (a list, or a range's bounds); [] where it is not given."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def bounds_of(low: float, high: float) -> list[float]:
    """[low, high] of a calibrated threshold, to 4 decimals: the low end rounded up (a threshold
    above it is above every measured value), the high end never under it."""
    rounded = math.ceil(low * 1e4) / 1e4
    return [rounded, max(rounded, round(high, 4))]
