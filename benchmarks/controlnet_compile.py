"""How much of a compiled ControlNet pipeline's step did an eager ControlNet cost? Before
2026-12-07 a study with `compile = "regional"` compiled the denoiser and left the ControlNet
beside it eager, so every baseline and trial was timed slower than a server that compiles both.
On builtin:tiny-sd-controlnet (the tiny UNet and a ControlNet built from it; 64 px, 20 steps,
batch 2) and builtin:tiny-flux-controlnet (128 px, 20 steps, batch 2), CPU, inductor:

- eager: nothing compiled;
- denoiser only: the denoiser's repeated blocks compiled, the ControlNet eager (as measured before);
- both: the ControlNet's copies of those blocks compiled too (`compile_denoiser`, now).

Each: one call that compiles (its seconds printed apart), then `repeats` timed calls, in rounds
that cycle the three pipelines (the machine's drift hits each alike); s/image is their median.

    python -m benchmarks controlnet-compile --repeats 5     # about 3 minutes on 2 cores
"""

from __future__ import annotations

import statistics
import time

from PIL import Image

from benchmarks.common import machine, table
from optsearch.measure.builtin import build_builtin
from optsearch.measure.compiling import compile_denoiser
from optsearch.measure.generation import GenerationConfig, generate
from optsearch.measure.prompts import ConditionedPrompt

MODELS = (("builtin:tiny-sd-controlnet", 64, 7.5), ("builtin:tiny-flux-controlnet", 128, 3.5))


def _pipeline(model: str, how: str):
    pipe = build_builtin(model)
    pipe.set_progress_bar_config(disable=True)
    if how == "denoiser only":
        denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        denoiser.compile_repeated_blocks(fullgraph=False, backend="inductor")
    elif how == "both":
        compile_denoiser(pipe, "regional")
    return pipe


def main(repeats: int = 5) -> None:
    started = time.perf_counter()
    for model, size, guidance in MODELS:
        prompts = [ConditionedPrompt(text, Image.new("RGB", (size, size), color)) for text, color in
                   (("a red cube", (200, 40, 40)), ("a green ball", (40, 200, 40)))]
        config = GenerationConfig(steps=20, height=size, width=size, guidance_scale=guidance,
                                  batch_size=2)
        pipes, first = {}, {}
        for how in ("eager", "denoiser only", "both"):
            pipes[how] = _pipeline(model, how)
            clock = time.perf_counter()
            list(generate(pipes[how], prompts, config, warmup=False))  # compiles
            first[how] = time.perf_counter() - clock
        seconds = {how: [] for how in pipes}
        for _ in range(repeats):
            for how, pipe in pipes.items():
                seconds[how].append(sum(b.seconds for b in generate(pipe, prompts, config)) / len(prompts))
        eager = statistics.median(seconds["eager"])
        rows = [[how, statistics.median(values), min(values), max(values),
                 eager / statistics.median(values), first[how]] for how, values in seconds.items()]
        print(f"\n# {model}, {size} px, 20 steps, batch 2, {repeats} rounds ({machine()})")
        print(table(["compiled", "s/image (median)", "min", "max", "speedup vs eager",
                     "first call s (compiling)"], rows), flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
