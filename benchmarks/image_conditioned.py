"""Do the caches gain as much on an editing or inpainting pipeline as on text-to-image? FLUX
Kontext runs FLUX's transformer with the image to edit's tokens beside the generated image's, in
every block; FLUX Fill reads the masked image and the mask as extra input channels, and its loop
passes the transformer timestep / 1000 with no current timestep of its own (PAB's window reads it
from the calls). Image-to-image at strength 0.6 denoises 12 of the 20 steps (a cache has fewer
steps to skip among); FLUX's ControlNet runs its own two blocks beside the transformer at every
step, unaccelerated. The same settings on builtin:tiny-flux, builtin:tiny-flux-kontext,
builtin:tiny-flux-fill, builtin:tiny-flux-img2img and builtin:tiny-flux-controlnet (their weights,
128 px out; the shipped studies/edits and studies/fills images resized to 128 px in), CPU.

Each setting: the short warm-up, then `repeats` timed passes over 4 prompts (batch 2), A/B
interleaved with the model's baseline; speedup = baseline s/image / setting s/image (median of
the passes); PSNR against that model's baseline images (random weights: fidelity, not quality).
FirstBlockCache's threshold is the middle of the range calibrated on each model (as "auto"
draws from), so each acts as much as its own residuals allow.

    python -m benchmarks image-conditioned --repeats 3     # about 2 minutes on 2 cores
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import ab_rounds, machine, table
from optsearch.accelerators import fbcache
from optsearch.measure.generation import GenerationConfig, call_inputs, generate
from optsearch.measure.models import load_pipeline
from optsearch.measure.prompts import ConditionedPrompt
from optsearch.measure.quality import psnr

STUDIES = Path(__file__).resolve().parents[1] / "studies"
SETTINGS = [("taylorseer 5/3/1", {"taylorseer": {"cache_interval": 5, "disable_cache_before_step": 3}}),
            ("pab 2, below 800", {"pab": {"spatial_attention_block_skip_range": 2,
                                          "timestep_skip_high": 800}}),
            ("steps 14 of 20", {"steps": {"num_inference_steps": 14}})]


def examples(folder: str, count: int = 4) -> list[ConditionedPrompt]:
    """The first `count` prompts of a shipped folder, their images (and masks) at 128 px."""
    def read(name: str, mode: str):
        return Image.open(STUDIES / folder / name).convert(mode).resize((128, 128))

    rows = [json.loads(line) for line in (STUDIES / folder / "metadata.jsonl").read_text().splitlines()]
    return [ConditionedPrompt(row["prompt"], read(row["file_name"], "RGB"),
                              read(row["mask_file_name"], "L") if "mask_file_name" in row else None)
            for row in rows[:count]]


def main(repeats: int = 3) -> None:
    started = time.perf_counter()
    edits = examples("edits")
    base = GenerationConfig(steps=20, height=128, width=128, guidance_scale=2.5, batch_size=2)
    rows = []
    for model, prompts, strength in (("builtin:tiny-flux", [str(p) for p in edits], None),
                                     ("builtin:tiny-flux-kontext", edits, None),
                                     ("builtin:tiny-flux-fill", examples("fills"), None),
                                     ("builtin:tiny-flux-img2img", edits, 0.6),
                                     ("builtin:tiny-flux-controlnet", edits, None)):
        pipe = load_pipeline(model, device="cpu", dtype="float32")
        config = replace(base, strength=strength)

        def run(setting=None, pipe=pipe, prompts=prompts, config=config):
            batches = list(generate(pipe, prompts, config, setting=setting))
            return np.concatenate([b.images for b in batches]), sum(b.seconds for b in batches)

        reference, _ = run()
        low, high = fbcache.calibrate(pipe, lambda pipe=pipe, prompts=prompts, config=config: pipe(
            **call_inputs(prompts[:2], pipe), num_inference_steps=config.steps, height=128, width=128,
            output_type="latent", **config.guidance_kwargs(2, pipe)))["auto"]["threshold"]
        settings = [*SETTINGS, (f"fbcache {(low + high) / 2:.3f} (mid-range)",
                                {"fbcache": {"threshold": (low + high) / 2}})]
        for label, setting in settings:
            ratios, images, computed = ab_rounds(pipe, run, setting, repeats)
            fidelity = float(np.mean([psnr(a, b) for a, b in zip(reference, images, strict=True)]))
            name = model.removeprefix("builtin:") + (f" @{strength}" if strength else "")
            rows.append([name, label, statistics.median(ratios),
                         min(ratios), max(ratios), fidelity,
                         "-" if computed is None else f"{computed:.0%}"])
            print(f"{model} {label}: {statistics.median(ratios):.2f}x, {fidelity:.1f} dB", flush=True)
    print(f"\n# 20 steps, 128 px, 4 prompts, batch 2, {repeats} A/B rounds ({machine()})")
    print(table(["model", "setting", "speedup (median)", "min", "max", "PSNR vs baseline (dB)",
                 "computed"], rows))
    print(f"total {time.perf_counter() - started:.0f} s")
