"""What makes two timings comparable: device, dtype, library versions, batch size, threads.

Trials are compared only with a baseline of the same fingerprint, and a stored result is reused
only on the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import platform

import diffusers
import torch

from optsearch.accelerators import attention_of, denoiser, execution_device, offload_of
from optsearch.measure.compiling import compiled_as


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()}"


def fingerprint(pipe, batch_size: int) -> tuple[str, dict]:
    """A short id of the timing conditions of `pipe` at `batch_size`, and the facts behind it."""
    model, device = denoiser(pipe), execution_device(pipe)
    facts = {
        "device": device_name(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "batch_size": batch_size,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }
    offload = offload_of(pipe)
    if offload is not None:  # only then, like compile: plain studies keep their fingerprints
        facts["offload"] = offload
    attention = attention_of(pipe)
    if attention not in (None, "native"):  # the same: a backend other than torch's SDPA
        facts["attention"] = attention
    compiled = compiled_as(pipe)
    if compiled is not None:  # only then: eager studies keep their fingerprints
        facts["compile"] = compiled
    digest = hashlib.sha1(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    return digest, facts
