"""Peak memory of a stretch of work: what a setting needs on the device it will be served on.

A cache that keeps features (TaylorSeer's derivatives, DBCache's residuals) can need gigabytes the
baseline does not; a setting that does not fit is found here, not on the user's server. On CUDA
the figure is `torch.cuda.max_memory_allocated` (reset at the start); on a CPU the process's peak
resident set (Linux's VmHWM, reset through /proc/self/clear_refs), so it counts the weights and
everything else the process holds, as the server's would, but for the weights distill keeps on
the CPU to unfuse a LoRA after its trial (a server does not hold them). None where neither can
be read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from optsearch.accelerators.distill import kept_bytes

GIB = 2**30
T = TypeVar("T")
_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _resident_peak_bytes() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """The peak over the steps of an iteration: `for batch in peak.measure(batches)` counts each
    batch's generation (the `next()` that makes it), not what the loop body does with it (CLIP
    scoring); `peak.gib` is the highest so far, None where it cannot be read."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.gib: float | None = None

    def measure(self, items: Iterable[T]) -> Iterator[T]:
        iterator = iter(items)
        while True:
            self._reset()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self._read()
            yield item

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            _CLEAR_REFS.write_text("5")  # the peak resident set starts again from now
        except OSError:
            pass

    def _read(self) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _resident_peak_bytes()
            peak = None if peak is None else peak - kept_bytes()
        if peak is not None:
            self.gib = max(self.gib or 0.0, peak / GIB)
