"""Fault injection for tests of the worker and the commands (the only code here that exists for tests).

OPTSEARCH_FAULT_OOM="K" makes the K-th timed batch of a setting (0-based, counted over the
worker's life) raise torch.cuda.OutOfMemoryError once; "K:memory" raises MemoryError instead;
"K:every" raises it at every timed batch of a setting from the K-th on (no setting fits).
OPTSEARCH_FAULT_ERROR="K" makes it raise a RuntimeError, as a fault no check foresaw would.
OPTSEARCH_FAULT_OOM_BASELINE="N" makes the first N timed batches of the baseline raise
torch.cuda.OutOfMemoryError, as a batch size too large for the device would; "N@S" the N after
the first S (a re-timing between trials).
OPTSEARCH_FAULT_SLOW_BASELINE="S" adds S seconds to each batch of the worker's first baseline
timing, as a baseline timed while another process shared the device would read; "S:always" to
every baseline timing.
Every command's evaluator reads them (`evaluator_from_spec`), and `check`'s one batch; a worker
reads them anew. Unset, nothing happens.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable

import torch

ENV_OOM = "OPTSEARCH_FAULT_OOM"
ENV_SLOW_BASELINE = "OPTSEARCH_FAULT_SLOW_BASELINE"
ENV_ERROR = "OPTSEARCH_FAULT_ERROR"
ENV_OOM_BASELINE = "OPTSEARCH_FAULT_OOM_BASELINE"


def fault_from_env() -> Callable[[str, int], None] | None:
    """The faults the environment asks for, as one `fault(combo, batch index)` for the evaluator."""
    faults = [f for f in (oom_fault_from_env(), error_fault_from_env(), slow_baseline_from_env(),
                          baseline_oom_from_env()) if f is not None]
    if not faults:
        return None

    def fault(combo: str, batch_index: int) -> None:
        for each in faults:
            each(combo, batch_index)

    return fault


def slow_baseline_from_env() -> Callable[[str, int], None] | None:
    value = os.environ.get(ENV_SLOW_BASELINE)
    if not value:
        return None
    seconds, _, always = value.partition(":")
    timings = itertools.count()
    timing = [-1]  # which baseline timing of this worker is running

    def fault(combo: str, batch_index: int) -> None:
        if combo == "baseline" and batch_index == 0:
            timing[0] = next(timings)
        if combo == "baseline" and (timing[0] == 0 or always == "always"):
            time.sleep(float(seconds))

    return fault


def oom_fault_from_env() -> Callable[[str, int], None] | None:
    at, _, kind = os.environ.get(ENV_OOM, "").partition(":")
    message = f"injected out-of-memory at timed batch {at} ({ENV_OOM})"
    return _raise_at(at, lambda: MemoryError(message) if kind == "memory"
                     else torch.cuda.OutOfMemoryError(message), every=kind == "every")


def error_fault_from_env() -> Callable[[str, int], None] | None:
    at = os.environ.get(ENV_ERROR, "")
    return _raise_at(at, lambda: RuntimeError(f"injected fault at timed batch {at} ({ENV_ERROR})"))


def baseline_oom_from_env() -> Callable[[str, int], None] | None:
    value = os.environ.get(ENV_OOM_BASELINE)
    if not value:
        return None
    count, _, skip = value.partition("@")
    left, skipped = [int(count)], [int(skip or 0)]

    def fault(combo: str, batch_index: int) -> None:
        if combo != "baseline":
            return
        if skipped[0] > 0:
            skipped[0] -= 1
        elif left[0] > 0:
            left[0] -= 1
            raise torch.cuda.OutOfMemoryError(f"injected out-of-memory in the baseline ({ENV_OOM_BASELINE})")

    return fault


def _raise_at(at: str, error: Callable[[], Exception], every: bool = False
              ) -> Callable[[str, int], None] | None:
    """A fault raising `error()` at the `at`-th timed batch of a setting (`every`: and at each
    after it); None when `at` is empty."""
    if not at:
        return None
    target = int(at)
    counter = itertools.count()

    def fault(combo: str, batch_index: int) -> None:
        if combo != "baseline" and (next(counter) >= target if every else next(counter) == target):
            raise error()

    return fault
