"""Fault injection for tests of the worker (the only code here that exists for tests).

OPTSEARCH_FAULT_OOM="K" makes the K-th timed batch (0-based, counted over the worker's life) raise
torch.cuda.OutOfMemoryError once; "K:memory" raises MemoryError instead. Unset, nothing happens.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import torch

ENV_OOM = "OPTSEARCH_FAULT_OOM"


def oom_fault_from_env() -> Callable[[int], None] | None:
    value = os.environ.get(ENV_OOM)
    if not value:
        return None
    at, _, kind = value.partition(":")
    target = int(at)
    counter = itertools.count()

    def fault(batch_index: int) -> None:
        if next(counter) == target:
            message = f"injected out-of-memory at timed batch {target} ({ENV_OOM})"
            raise MemoryError(message) if kind == "memory" else torch.cuda.OutOfMemoryError(message)

    return fault
