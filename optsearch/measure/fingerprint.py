"""What makes two timings comparable: device, dtype, library versions, batch size, threads (and
how the pipeline offloads, quantizes, compiles and attends, where it does).

Trials are compared only with a baseline of the same fingerprint, and a stored result is reused
only on the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import re

import diffusers
import torch

from optsearch.accelerators import (
    attention_of,
    dtype_of,
    execution_device,
    offload_of,
    quantization_of,
    scheduler_of,
)
from optsearch.measure.compiling import compiled_as
from optsearch.measure.devices import device_name


def fingerprint(pipe, batch_size: int) -> tuple[str, dict]:
    """A short id of the timing conditions of `pipe` at `batch_size`, and the facts behind it."""
    device = execution_device(pipe)
    facts = {
        "device": device_name(device),
        "dtype": dtype_of(pipe),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "batch_size": batch_size,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
    }
    offload = offload_of(pipe)
    if offload is not None:  # only then, like compile: plain studies keep their fingerprints
        facts["offload"] = offload
    quantization = quantization_of(pipe)
    if quantization is not None:  # the same: only a quantized denoiser's fingerprint changes
        facts["quantization"] = quantization
    attention = attention_of(pipe)
    if attention not in (None, "native"):  # the same: a backend other than torch's SDPA
        facts["attention"] = attention
    compiled = compiled_as(pipe)
    if compiled is not None:  # only then: eager studies keep their fingerprints
        facts["compile"] = compiled
    digest = hashlib.sha1(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    return digest, facts


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 24  # elements per int64 sum (integer sums are exact modulo 2**64, in any order)


def _checksum(tensor: torch.Tensor) -> int | None:
    """An exact sum of the tensor's bit patterns: the same on any device, in any order. None
    where the values are not here to read (sequential offload's meta tensors) or not plain."""
    if tensor.device.type == "meta":
        return None
    try:
        bits = tensor.detach().contiguous().view(_BITS[tensor.element_size()]).flatten()
    except (KeyError, RuntimeError, TypeError):  # a quantized or other tensor subclass
        return None
    return sum(int(chunk.sum(dtype=torch.int64)) for chunk in bits.split(_CHUNK)) % (1 << 64)


# a LoRA adapter's tensors carry the name it was loaded under ("to_q.lora_A.optsearch.weight")
_ADAPTER_NAME = re.compile(r"\.(lora_A|lora_B|lora_embedding_[AB]|lora_magnitude_vector)\.[^.]+")


def _unnamed(key: str) -> str:
    """A tensor's name without what loading chose: torch.compile's wrapper, a LoRA's adapter
    name (the same LoRA loaded as "mine" or "default_0" is the same pipeline)."""
    return _ADAPTER_NAME.sub(r".\1", key.replace("_orig_mod.", ""))


def pipeline_signature(pipe) -> str:
    """Which pipeline this is: every component's weights (an exact checksum of each tensor's
    bits) and the scheduler class. A fused LoRA, a fine-tune, another revision or scheduler makes
    another signature; the same files loaded at the same dtype make the same one on any machine.
    Compared within one dtype (float16 and float32 copies of one model differ in their bits)."""
    parts: list = [scheduler_of(pipe)]
    for name, component in sorted(getattr(pipe, "components", {}).items()):
        if not isinstance(component, torch.nn.Module):
            continue
        tensors = [*component.named_parameters(), *component.named_buffers()]
        parts += [(name, _unnamed(key), list(tensor.shape), str(tensor.dtype), _checksum(tensor))
                  for key, tensor in tensors]
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]
