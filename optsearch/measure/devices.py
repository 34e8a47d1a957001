"""The device a spec's `device` loads on, and its name as fingerprints and records give it, from
torch alone: loading resolves it here, and a second `confirm` tells whether this device, under
these library versions, confirmed a study already without loading its pipeline."""

from __future__ import annotations

import platform
from importlib.metadata import version

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


def conditions_here(device: str) -> dict | None:
    """The timing conditions a fingerprint holds that this host tells without loading a
    pipeline: the device's name, torch's and diffusers' versions (diffusers' read from its
    metadata, not imported) and a CPU's thread count; None where the device is not here."""
    try:
        torch_device = resolve_device(device)
    except (ModelLoadError, RuntimeError):
        return None
    if torch_device.type not in ("cuda", "cpu"):
        return None
    return {"device": device_name(torch_device), "torch": torch.__version__,
            "diffusers": version("diffusers"),
            "threads": torch.get_num_threads() if torch_device.type == "cpu" else None}
