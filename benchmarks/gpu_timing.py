"""Real-size GPU timing of a random-weight SD 1.5 UNet (builtin:sd15-random).

512 px, 50 PNDM steps, fp16, batch 4, guidance 7.5: baseline and DeepCache 3/0, 5/0, ToMe 0.5,
T-GATE 10 and all three, in seconds per image and speedup, next to the published numbers
(RESULTS.md, GPU timing). Random weights change nothing about the cost of a step. One warm-up batch and two
timed batches per setting; the whole script runs in about 2-3 minutes on an H100.

    python -m benchmarks gpu-timing            # needs CUDA; prints a Markdown table
    python3 benchmarks/gpu_timing.py           # the same, as the GPU check runs it
    python -m benchmarks gpu-timing --smoke    # the same code on the CPU: builtin:tiny, 32 px
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file (`python3 benchmarks/gpu_timing.py`: the GPU check)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, table  # noqa: E402
from optsearch.accelerators import AppliedSetting  # noqa: E402
from optsearch.measure.generation import GenerationConfig, generate  # noqa: E402
from optsearch.measure.models import load_pipeline  # noqa: E402
from optsearch.measure.prompts import builtin_prompts  # noqa: E402

SETTINGS = [
    ("baseline", {}, "1.00"),
    ("DeepCache 3/0", {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}}, "1.68 (N=3)"),
    ("DeepCache 5/0", {"deepcache": {"cache_interval": 5, "cache_branch_id": 0}}, "2.11 (N=5)"),
    ("ToMe 0.5", {"tome": {"ratio": 0.5}}, "1.87 (512 px)"),
    ("T-GATE 10", {"tgate": {"gate_step": 10}}, "1.63 (of 25 steps)"),
    ("all three", {"deepcache": {"cache_interval": 3, "cache_branch_id": 0}, "tome": {"ratio": 0.5},
                   "tgate": {"gate_step": 10}}, "-"),
]


def main(batches: int = 2, smoke: bool = False) -> None:
    if not smoke and not torch.cuda.is_available():
        sys.exit("gpu_timing.py needs a CUDA GPU (the device tool lends one to some sessions; "
                 "--smoke runs its code on the CPU)")
    started = time.perf_counter()
    if smoke:  # the same code at a size the CPU runs in seconds (the suite runs it)
        batches = 1
        pipe = load_pipeline("builtin:tiny", device="cpu", dtype="float32")
        config = GenerationConfig(steps=12, guidance_scale=7.5, batch_size=4)  # native 32 px
    else:
        pipe = load_pipeline("builtin:sd15-random", device="cuda", dtype="float16")
        config = GenerationConfig(steps=50, height=512, width=512, guidance_scale=7.5, batch_size=4)
    prompts = builtin_prompts()[: 4 * batches]
    rows, baseline = [], None
    for name, setting, published in SETTINGS:
        with AppliedSetting(pipe, setting) as applied:
            seconds = sum(b.seconds for b in generate(pipe, prompts, config, setting=applied))
        per_image = seconds / len(prompts)
        baseline = baseline or per_image
        rows.append([name, per_image, baseline / per_image, published])
        print(f"{name}: {per_image:.3f} s/image", flush=True)
    what = "SMOKE (CPU, builtin:tiny: not a measurement)" if smoke else \
        "GPU timing, random-weight SD 1.5 UNet, 512 px, 50 PNDM steps, fp16, batch 4"
    print(f"\n# {what} ({machine()})")
    print(table(["setting", "s/image", "speedup", "published speedup (real weights)"], rows))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:] if a != "--smoke"), smoke="--smoke" in sys.argv)
