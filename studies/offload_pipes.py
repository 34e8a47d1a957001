"""Factories for a GPU that cannot hold the pipeline whole, built as such a server builds it.

FLUX.1-dev is about 33 GB in bfloat16 (its transformer alone 24 GB): on a 24 GB card it runs
with diffusers' group offload, which keeps the weights on the host and moves one transformer
block at a time to the GPU, on a side CUDA stream that overlaps the next block's transfer with
this block's compute. optsearch measures the pipeline as built: the transfers are in every
timing, as they are on that server. A spec beside this file names it as
`model.id = "offload_pipes:flux_dev_group_offload"` (studies/flux-dev-offload.toml).

FLUX.2 [dev] is about 112 GB in bfloat16 (a 32B transformer, a 24B Mistral text encoder): on an
80 GB GPU each model fits alone, so diffusers' model offload moves each to the GPU while it runs
(`flux2_dev_model_offload`, studies/flux2-dev-offload.toml).
"""

from __future__ import annotations

import torch
from diffusers import Flux2Pipeline, FluxPipeline

from optsearch.measure.models import dtype_option  # dtype= or torch_dtype=, as diffusers takes it

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
FLUX2_DEV = "black-forest-labs/FLUX.2-dev"


def flux_dev_group_offload(device: torch.device, dtype: torch.dtype) -> FluxPipeline:
    """FLUX.1-dev with every model group-offloaded, one block at a time (a few GB of the GPU)."""
    pipe = FluxPipeline.from_pretrained(FLUX_DEV, **dtype_option(dtype))
    on_gpu = device.type == "cuda"  # the streams and pinned memory are CUDA's
    pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                              offload_type="block_level", num_blocks_per_group=1,
                              use_stream=on_gpu, record_stream=on_gpu)
    return pipe


def flux2_dev_model_offload(device: torch.device, dtype: torch.dtype) -> Flux2Pipeline:
    """FLUX.2 [dev] with model offload: the text encoder, then the transformer, then the VAE
    on the GPU while it runs, the others on the host (an 80 GB GPU holds each alone)."""
    pipe = Flux2Pipeline.from_pretrained(FLUX2_DEV, **dtype_option(dtype))
    pipe.enable_model_cpu_offload(device=device)
    return pipe
