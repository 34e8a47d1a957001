"""cache-dit imported quietly, and its predefined Steps Computation Masks (SCM): which steps of a
call always compute, for each step count cache-dit defines a mask for. The dbcache family searches
a mask by its policy's name (`steps_computation_mask`) and builds it for each call's step count.
"""

from __future__ import annotations

import os

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
