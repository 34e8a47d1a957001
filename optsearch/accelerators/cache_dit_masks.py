"""cache-dit imported quietly, and its predefined Steps Computation Masks (SCM): which steps of a
call always compute, for each step count cache-dit defines a mask for. The dbcache family searches
a mask by its policy's name (`steps_computation_mask`) and builds it for each call's step count.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

MASK_POLICIES = ("none", "slow", "medium", "fast", "ultra")  # cache-dit's, least skipping first
MASK_STEP_COUNTS = "4, 6 or 8 and more"  # what cache-dit's predefined masks are defined for


def quiet_cache_dit():
    """cache_dit, imported with its log level at "error" unless the user set one."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # its tables and notes on every call
    import cache_dit

    return cache_dit


def steps_mask(policy: str, steps: int) -> list[int] | None:
    """cache-dit's predefined mask `policy` for a call of `steps` steps (1: the step computes),
    None for "none". A ValueError names the step counts cache-dit defines masks for."""
    if policy == "none":
        return None
    if policy not in MASK_POLICIES:
        raise ValueError(f"dbcache.steps_computation_mask={policy!r} is not one of "
                         f"{', '.join(map(repr, MASK_POLICIES))}")
    if steps < 8 and steps not in (4, 6):
        raise ValueError(f"dbcache.steps_computation_mask={policy!r} needs {MASK_STEP_COUNTS} "
                         f"steps (cache-dit defines its masks for those), not {steps}")
    return list(quiet_cache_dit().steps_mask(total_steps=int(steps), mask_policy=policy))


def mask_problem(policy: str, steps: int) -> str | None:
    """Why mask `policy` cannot run a call of `steps` steps (`steps_mask`'s error), or None."""
    try:
        steps_mask(policy, steps)
    except ValueError as error:
        return str(error)
    return None


def mask_step_problem(policies, step_counts) -> str | None:
    """Why a study that searches the masks `policies` at `step_counts` cannot run them all."""
    masks = [policy for policy in policies if policy != "none"]
    unfit = sorted(count for count in step_counts if mask_problem(masks[0], count)) if masks else []
    if not unfit:
        return None
    return (f"{masks[0]!r} needs {MASK_STEP_COUNTS} steps (cache-dit defines its masks for "
            f"those); trials would run {unfit[0]}")


def measured_diffs(calibration: Mapping, fn: int) -> dict[int, list]:
    """{step count: [[step, residual difference], ...]} of Fn = `fn` in every run a DBCache
    calibration made (the model's step count and each count in `at_steps`)."""
    runs = {calibration.get("steps"): calibration.get("diffs", {}).get(str(fn))}
    runs.update({int(count): measured.get("diffs", {}).get(str(fn))
                 for count, measured in calibration.get("at_steps", {}).items()})
    return {int(count): diffs for count, diffs in runs.items() if count and diffs}


def diffs_at(runs: Mapping[int, list], steps: int) -> list[tuple[int, float]] | None:
    """The per-step differences of a run of `steps` steps: as measured where a calibration ran
    that count; between two counts it ran, each step read at the same fraction of the two
    measured runs and blended as the ranges are (linearly in the step count). A mask's range
    needs them step by step: the blend of two ranges is not the least difference on the steps a
    mask lets skip at the count between. None outside the calibrated counts."""
    if steps in runs:
        return [(int(step), float(diff)) for step, diff in runs[steps]]
    below = max((count for count in runs if count < steps), default=None)
    above = min((count for count in runs if count > steps), default=None)
    if below is None or above is None or steps < 2:
        return None
    share = (steps - below) / (above - below)
    read = []
    for count in (below, above):
        measured_steps, diffs = np.array(runs[count], dtype=float).T
        places = np.arange(steps) * (count - 1) / (steps - 1)  # each step's place in that run
        inside = (places >= measured_steps.min()) & (places <= measured_steps.max())
        read.append((inside, np.interp(places, measured_steps, diffs)))
    (inside_below, at_below), (inside_above, at_above) = read
    blended = (1 - share) * at_below + share * at_above
    inside = inside_below & inside_above
    return [(step, float(blended[step])) for step in range(steps) if inside[step]]
