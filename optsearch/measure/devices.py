"""A device's name as fingerprints and records give it, from torch alone: a second `confirm`
tells whether this device confirmed a study already without loading its pipeline."""

from __future__ import annotations

import platform

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}"


def named_device(device: str) -> str | None:
    """The name of the device a spec's `device` ("auto": CUDA where there is one) loads on;
    None where it is not here (loading it says why, in one line)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        return None
    if torch_device.type == "cuda" and (not torch.cuda.is_available() or (
            torch_device.index is not None and torch_device.index >= torch.cuda.device_count())):
        return None
    return device_name(torch_device) if torch_device.type in ("cuda", "cpu") else None
