"""What does a step-distilled LoRA save beyond its fewer steps, and what does it cost per step?
A distilled LoRA (Lightning, Hyper-SD) is run at a few steps with guidance off. Against plain
fewer steps at the same count, it adds its adapter's low-rank work at every step, and on a
guided pipeline it drops a whole guidance pass; a cache on top skips blocks of the distilled model.
Random weights cannot tell quality here, only where the time goes.

On builtin:tiny (SD's UNet, 64 px: guidance batched in one call) and builtin:tiny-qwen-image
(128 px: true CFG 4.0 with a negative prompt, two calls a step), CPU, batch 2, a baseline of 20
guided steps; a rank-16 LoRA on every attention projection (drawn, as tests/test_distill.py's):

- steps 8: plain, 8 steps, guided (the reference line);
- distill, cfg kept: the LoRA as an adapter, 8 steps, guided (its adapter cost alone);
- distill: the LoRA, 8 steps, guidance off (as served);
- distill, fused: the same, fused into the weights for the setting (`fuse = true`);
- distill + cache: the same with DeepCache (interval 2) on the UNet, TaylorSeer (interval 2 from
  step 2, a fixed schedule) on Qwen-Image.

Each setting is timed in rounds that cycle all six (the machine's drift hits each alike);
s/image is the median of `repeats` rounds, the speedup the baseline's median over it.

    python -m benchmarks distill --repeats 5     # about 2 minutes on 2 cores

`--compile regional` times every setting on the denoiser compiled as a server does (inductor;
each setting's first round compiles what it needs, and the median keeps it out), every LoRA
fused (`fuse = true`, as a compiled study requires): an adapter's recompile left tiny
Qwen-Image's plain blocks on a slower graph for every later call (0.208 -> 0.243 s), which would
bias every row after it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, table
from benchmarks.lora import _save_lora, _seconds
from optsearch.measure.builtin import build_builtin
from optsearch.measure.compiling import compile_denoiser
from optsearch.measure.generation import GenerationConfig
from optsearch.measure.prompts import builtin_prompts

MODELS = (("builtin:tiny", 64, {"guidance_scale": 7.5}, "unet_lora_layers",
           {"deepcache": {"cache_interval": 2, "cache_branch_id": 0}}),
          ("builtin:tiny-qwen-image", 128, {"guidance_scale": 1.0, "true_cfg_scale": 4.0,
                                            "negative_prompt": " "}, "transformer_lora_layers",
           {"taylorseer": {"cache_interval": 2, "disable_cache_before_step": 2}}))
STEPS = 8


def main(repeats: int = 5, compile: str = "none") -> None:
    started = time.perf_counter()
    prompts = builtin_prompts()[:2]
    for model, size, guidance, layers, cache in MODELS:
        config = GenerationConfig(steps=20, height=size, width=size, batch_size=2, **guidance)
        pipe = build_builtin(model)
        pipe.set_progress_bar_config(disable=True)
        compile_denoiser(pipe, compile)
        with tempfile.TemporaryDirectory() as folder:
            lora = _save_lora(model, layers, Path(folder))
            few, fused = {"steps": {"num_inference_steps": STEPS}}, compile != "none"
            settings = {"baseline (20 steps)": None, f"steps {STEPS}": few,
                        "distill, cfg kept": {"distill": {"lora": lora, "cfg": True, "fuse": fused}, **few},
                        "distill": {"distill": {"lora": lora, "fuse": fused}, **few},
                        "distill, fused": {"distill": {"lora": lora, "fuse": True}, **few},
                        f"distill + {next(iter(cache))}": {"distill": {"lora": lora, "fuse": fused},
                                                           **few, **cache}}
            seconds = {name: [] for name in settings}
            for _ in range(repeats):
                for name, setting in settings.items():
                    seconds[name].append(_seconds(pipe, prompts, config, setting))
        median = {name: statistics.median(values) for name, values in seconds.items()}
        baseline, reference = median["baseline (20 steps)"], median[f"steps {STEPS}"]
        rows = [[name, value, baseline / value, reference / value] for name, value in median.items()]
        print(f"\n# {model}, {size} px, batch 2, rank-16 LoRA, {repeats} rounds, compile {compile} "
              f"({machine()})")
        print(table(["setting", "s/image (median)", "speedup", f"vs steps {STEPS}"], rows), flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
