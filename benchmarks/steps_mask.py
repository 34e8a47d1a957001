"""cache-dit's predefined steps masks (SCM) under DBCache's "static" policy, against plain fewer
steps with as many full computations, on builtin:tiny-flux and builtin:tiny-qwen-image (128 px,
20 steps), CPU.

At 20 steps the masks compute 15 ("slow"), 12 ("medium"), 8 ("fast") and 5 ("ultra") steps in
full; on the others DBCache still runs its first block (F1B0) and reuses the cached residual of
the rest. Each mask is measured beside `steps` = its own count of full computations: the question
is whether reusing the residual on the masked steps beats not running them at all. Measured as
`families` measures (A/B rounds against the baseline, PSNR against the baseline's images: random
weights, so fidelity, not quality); both sides of each pair come from the same run.

    python -m benchmarks steps-mask --repeats 3     # about 4 minutes on 2 cores
"""

from __future__ import annotations

import time

from benchmarks.common import machine, table
from benchmarks.families import measure
from optsearch.accelerators import dbcache
from optsearch.measure.generation import GenerationConfig
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import builtin_prompts

STEPS = 20


def settings() -> list[tuple[str, dict]]:
    rows = []
    for policy in ("slow", "medium", "fast", "ultra"):
        computed = sum(dbcache.steps_mask(policy, STEPS))
        rows.append((f"steps {computed}", {"steps": {"num_inference_steps": computed}}))
        rows.append((f"dbcache F1B0 mask {policy!r} static ({computed} full)", {"dbcache": {
            "steps_computation_mask": policy, "steps_computation_policy": "static"}}))
    return rows


def main(repeats: int = 3) -> None:
    started = time.perf_counter()
    prompts = builtin_prompts()[:4]
    headers = ["setting", "speedup (median)", "min", "max", "PSNR vs baseline (dB)"]
    for model in ("builtin:tiny-flux", "builtin:tiny-qwen-image"):
        pipe = load_pipeline(model, device="cpu", dtype="float32")
        config = GenerationConfig(steps=STEPS, guidance_scale=3.5, batch_size=2)
        print(f"{model}:", flush=True)
        rows = measure(pipe, config, prompts, settings(), repeats)
        print(f"\n# {model}, {STEPS} steps, 4 prompts, batch 2, {repeats} A/B rounds ({machine()})")
        print(table(headers, rows), flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
