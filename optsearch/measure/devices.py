"""The device a spec's `device` loads on, and its name as fingerprints and records give it, from
torch alone: loading resolves it here, and a second `confirm` tells whether this device
confirmed a study already without loading its pipeline."""

from __future__ import annotations

import platform

import torch

from optsearch.errors import ModelLoadError


def resolve_device(device: str) -> torch.device:
    """`auto`: CUDA where there is one, else the CPU; ModelLoadError, one line, for a CUDA
    device that is not here."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available here")
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)"
            )
    return torch_device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}"


def named_device(device: str) -> str | None:
    """The name of the device a spec's `device` loads on; None where it is not here (loading it
    says why, in one line)."""
    try:
        torch_device = resolve_device(device)
    except (ModelLoadError, RuntimeError):
        return None
    return device_name(torch_device) if torch_device.type in ("cuda", "cpu") else None
