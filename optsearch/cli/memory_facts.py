"""`check`'s memory facts: the plain pipeline's peak against what is free, what TaylorSeer's
factors add, and the host memory a fused distilled LoRA's copy takes. Each is found at `check`,
not by a worker running out of memory on the user's machine."""

from __future__ import annotations

import os
import resource
from dataclasses import replace

import torch

from optsearch.accelerators import apply_setting, distill, taylorseer
from optsearch.measure.generation import GenerationConfig, generate
from optsearch.optimize.recovery import OUT_OF_MEMORY

GIB = 1024 ** 3


def memory_now(device: torch.device) -> tuple[float | None, float | None]:
    """(peak GiB used by this process on `device`, GiB free there now)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return torch.cuda.max_memory_allocated(device) / GIB, free / GIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux
    return peak, host_available_gib()


def host_available_gib() -> float | None:
    """The host memory available now, in GiB: Linux's MemAvailable (free and reclaimable), else
    the free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB
    except (ValueError, OSError):
        return None


def factor_bytes(pipe, prompts: list[str], config: GenerationConfig, order: int, lite: bool
                 ) -> int | None:
    """TaylorSeer's factor bytes in one call; None where that call ran out of memory (a fact
    about the space, not a reason the study cannot run: its trials halve their batch)."""
    try:
        return taylorseer.peak_factor_bytes(pipe, lambda steps: list(generate(
            pipe, prompts, replace(config, steps=steps), warmup=False)), order, lite)
    except OUT_OF_MEMORY:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def _size(size: int) -> str:
    return f"{size / GIB:.3g} GiB" if size >= GIB else f"{size / 2**20:.3g} MiB"


def factors_text(facts: dict, free: float | None) -> list[str]:
    """What TaylorSeer's factors add to the plain pipeline's memory in each mode searched, at the
    highest order searched: full mode keeps every attention output's (TaylorSeer #5: over 50 GB on
    FLUX), lite mode the output projection's alone."""
    held = facts.get("taylorseer_factors")
    if not held:
        return []
    modes = ", ".join(f"{'lite' if lite else 'full'} mode "
                      + ("ran out of memory" if size is None else _size(size))
                      for lite, size in held.items())
    lines = [f"taylorseer: its factors add {modes} at batch size {facts['batch_size']} and "
             f"max_order {facts['taylorseer_order']} (measured in one call)"]
    if None in held.values() or (free is not None
                                 and max(size or 0 for size in held.values()) / GIB > free):
        lines.append("memory: taylorseer's factors need more than the "
                     + (f"{free:.1f} GiB free now" if free is not None else "memory free now")
                     + ": lower prompts.batch_size or max_order, or set use_lite_mode = true")
    return lines


def fused_copy_bytes(pipe, spec) -> int | None:
    """The most host memory a fused distilled LoRA's copy takes (the layers it adapts, kept on
    the CPU to unfuse after each trial), over the LoRAs the spec searches fused; None where it
    searches none fused. Each is loaded as an adapter to count them: nothing is copied."""
    if True not in spec.searched_values("distill")["fuse"]:  # each recipe's too
        return None
    largest = 0
    for setting in spec.distill_settings():
        applied = apply_setting(pipe, {"distill": {**setting["distill"], "fuse": False}})
        try:
            largest = max(largest, distill.adapted_bytes(pipe))
        finally:
            applied.restore()
    return largest


def fused_copy_text(facts: dict) -> list[str]:
    """The fused copy's host memory against what the host has available now."""
    size, available = facts.get("fused_copy_bytes"), facts.get("host_available_gib")
    if size is None:
        return []
    lines = [f"distill fused: keeps {_size(size)} of the layers its LoRA adapts in host memory, to "
             "unfuse after each trial (one copy per worker)"
             + (f"; {available:.1f} GiB available now" if available is not None else "")]
    if available is not None and size / GIB > available:
        lines.append(f"memory: distill's fused copy needs more than the {available:.1f} GiB of host "
                     "memory available now: add host memory, or search space.distill.fuse = false")
    return lines
