"""The common shape of an accelerator: its parameter space and validation.

Each accelerator module declares its `PARAMS` with this class, the pipeline kinds it
`APPLIES_TO` ("unet", "transformer"), and offers an `apply(pipe, ...)` whose returned patch has
`restore()` (and optionally `prepare(call_kwargs)`, run before every pipeline call). Accelerators
know nothing of Optuna.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    """One tunable parameter: its type, the widest range that makes sense, and its default range."""

    name: str
    kind: type  # int, float or bool
    default: tuple  # (low, high) searched by default, or (value,) for a fixed value
    minimum: float | None = None  # inclusive lower bound of any valid value
    maximum: float | None = None  # inclusive upper bound
    exclusive_maximum: bool = False
    grid_step: float = 1
    help: str = ""
    counts_steps: bool = False  # measured in denoising steps: must fit in the setting's steps
    scales_with_steps: bool = False  # `default` holds fractions of model.steps
    calibrated: bool = False  # a threshold whose range may be "auto": measured before the search

    def default_range(self, model_steps: int) -> tuple:
        """The range searched when a spec names none (fractions resolved against model.steps)."""
        if not self.scales_with_steps:
            return self.default
        return tuple(max(1, round(fraction * model_steps)) for fraction in self.default)

    def check(self, value) -> str | None:
        """Return why `value` is not allowed, or None when it is."""
        if self.kind is bool:
            return None if isinstance(value, bool) else "must be true or false"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a{'n integer' if self.kind is int else ' number'}"
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
        low = "-inf" if self.minimum is None else self.minimum
        high = "inf" if self.maximum is None else self.maximum
        closing = ")" if self.exclusive_maximum or self.maximum is None else "]"
        return f"{self.kind.__name__} in [{low}, {high}{closing}"


class CalibratedRange(list):
    """[low, high] of an "auto" parameter, measured on the device. Where what it bounds moves
    with another parameter (DBCache's residual differences with Fn), `by` = (that parameter,
    {its value: [low, high]}) and a trial samples within the range of the value it drew."""

    def __init__(self, bounds, by: tuple[str, Mapping] | None = None):
        super().__init__(bounds)
        self.by = by

    @classmethod
    def stored(cls, calibration: Mapping, param: str) -> CalibratedRange:
        """The range of `param` in a family's calibration as `calibrate` returns and the study
        stores it ({"auto": {param: [lo, hi]}, "by": {param: [other, {value: [lo, hi]}]}})."""
        by = calibration.get("by", {}).get(param)
        return cls(calibration["auto"][param], tuple(by) if by else None)

    def for_setting(self, values: Mapping) -> list:
        """The range for a setting whose other parameters are drawn already."""
        if self.by is None:
            return list(self)
        param, ranges = self.by
        return list(ranges.get(str(values.get(param)), self))


def bounds_of(low: float, high: float) -> list[float]:
    """[low, high] of a calibrated threshold, to 4 decimals: the low end rounded up (a threshold
    above it is above every measured value), the high end never under it."""
    rounded = math.ceil(low * 1e4) / 1e4
    return [rounded, max(rounded, round(high, 4))]
