"""What does serving a LoRA as an adapter cost per step, and does a cache gain the same on it?
A LoRA kept as an adapter (diffusers' `load_lora_weights` + `set_adapters`, as a server that
switches LoRAs runs it) adds a low-rank product to every adapted projection at every call; a
fused one (`fuse_lora`, adapter unloaded) adds nothing. A cache skips whole blocks, adapters
included, so its speedup is relative to what a step costs on the pipeline served.

On builtin:tiny (SD's UNet, 64 px, 20 steps, batch 2, DeepCache interval 3) and builtin:tiny-flux
(128 px, 20 steps, batch 2, TaylorSeer interval 3 from step 2: a fixed schedule, so every
pipeline skips the same steps), CPU: a rank-16 LoRA on every attention
projection, drawn (tests/test_lora.py's kind); three pipelines:

- plain: no LoRA;
- adapter: the LoRA at scale 0.8, kept as an adapter;
- fused: the same, fused into the weights.

Each pipeline is timed plain and with the cache in rounds that cycle all six (the machine's
drift hits each alike); s/image is the median of `repeats` rounds.

    python -m benchmarks lora --repeats 5     # about 2 minutes on 2 cores
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from benchmarks.common import machine, table
from optsearch.accelerators import apply_setting, denoiser
from optsearch.measure.builtin import build_builtin
from optsearch.measure.generation import GenerationConfig, generate
from optsearch.measure.models import with_lora
from optsearch.measure.prompts import builtin_prompts

MODELS = (("builtin:tiny", 64, 7.5, "unet_lora_layers",
           {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}),
          ("builtin:tiny-flux", 128, 3.5, "transformer_lora_layers",
           {"taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2}}))
RANK = 16


def _save_lora(model: str, layers: str, folder: Path) -> str:
    pipe = build_builtin(model)
    torch.manual_seed(0)
    denoiser(pipe).add_adapter(LoraConfig(r=RANK, lora_alpha=RANK,
                                          target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, parameter in denoiser(pipe).named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    type(pipe).save_lora_weights(folder, **{layers: get_peft_model_state_dict(denoiser(pipe))})
    return str(folder)


def _pipeline(model: str, lora: str | None, fuse: bool):
    pipe = build_builtin(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe if lora is None else with_lora(pipe, [(lora, 0.8)], fuse=fuse)


def _seconds(pipe, prompts, config, setting: dict | None) -> float:
    applied = apply_setting(pipe, setting) if setting else None
    try:
        return sum(b.seconds for b in generate(pipe, prompts, config, setting=applied)) / len(prompts)
    finally:
        if applied is not None:
            applied.restore()


def main(repeats: int = 5) -> None:
    started = time.perf_counter()
    prompts = builtin_prompts()[:2]
    for model, size, guidance, layers, setting in MODELS:
        config = GenerationConfig(steps=20, height=size, width=size, guidance_scale=guidance,
                                  batch_size=2)
        with tempfile.TemporaryDirectory() as folder:
            lora = _save_lora(model, layers, Path(folder))
            pipes = {"plain": _pipeline(model, None, False), "adapter": _pipeline(model, lora, False),
                     "fused": _pipeline(model, lora, True)}
        seconds = {(name, cached): [] for name in pipes for cached in (False, True)}
        for _ in range(repeats):
            for (name, cached), values in seconds.items():
                values.append(_seconds(pipes[name], prompts, config, setting if cached else None))
        median = {key: statistics.median(values) for key, values in seconds.items()}
        plain = median[("plain", False)]
        rows = [[name, median[(name, False)], median[(name, False)] / plain,
                 median[(name, True)], median[(name, False)] / median[(name, True)]] for name in pipes]
        family = next(iter(setting))
        print(f"\n# {model}, {size} px, 20 steps, batch 2, rank-{RANK} LoRA, {repeats} rounds "
              f"({machine()})")
        print(table(["pipeline", "s/image (median)", "vs plain", f"with {family} s/image",
                     f"{family} speedup on it"], rows), flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
