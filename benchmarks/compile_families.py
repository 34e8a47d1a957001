"""Which families survive torch.compile, and what is their speedup compiled vs eager?

builtin:tiny-flux on this CPU (inductor, gcc), 4 prompts in batches of 2, 12 steps: each family
at one setting measured against an eager baseline on an eager pipeline, then against a compiled
baseline on a compiled pipeline (`model.compile = "regional"`: diffusers' compile_repeated_blocks,
fullgraph=False). For the compiled runs: the untimed warm-up's seconds (compile included), graphs
compiled there, graph breaks, and graphs compiled inside timed batches. A setting that fails
compiled says why.

    python -m benchmarks compile-families          # about 10 minutes on 2 idle cores
    python -m benchmarks compile-families --model builtin:tiny   # the UNet families (DeepCache,
                                                                 # ToMe, T-GATE) on SD's topology
"""

from __future__ import annotations

import time

from benchmarks.common import machine, table
from optsearch.measure.evaluate import evaluator_from_spec
from optsearch.measure.models import load_pipeline
from optsearch.study_spec import spec_from_dict

SETTINGS = {
    "steps 6/12": {"steps": {"num_inference_steps": 6}},
    "fbcache 0.5": {"fbcache": {"threshold": 0.5}},
    "taylorseer": {"taylorseer": {}},
    "magcache": {"magcache": {}},
    "pab": {"pab": {}},
    "fastercache": {"fastercache": {}},
    "dbcache 0.6": {"dbcache": {"residual_diff_threshold": 0.6}},
}
UNET_SETTINGS = {
    "steps 6/12": {"steps": {"num_inference_steps": 6}},
    "deepcache 3": {"deepcache": {"cache_interval": 3}},
    "tome 0.5": {"tome": {"ratio": 0.5}},
    "tgate 6": {"tgate": {"gate_step": 6}},
    "deepcache 3 + tome 0.5": {"deepcache": {"cache_interval": 3}, "tome": {"ratio": 0.5}},
}


def main(backend: str = "inductor", steps: int = 12, model: str = "builtin:tiny-flux") -> None:
    started = time.perf_counter()
    settings = SETTINGS if model == "builtin:tiny-flux" else UNET_SETTINGS
    rows = {name: [name] for name in settings}
    for how in ("none", "regional"):
        spec = spec_from_dict({
            "name": "compile", "model": {"id": model, "device": "cpu", "steps": steps,
                                         "guidance_scale": 3.5 if model == "builtin:tiny-flux" else 7.5,
                                         "compile": how, "compile_backend": backend},
            "prompts": {"source": "builtin", "num_samples": 4, "batch_size": 2},
            "quality": {"clip_model": "builtin:tiny", "clip_pretrained": "none", "metric": "psnr",
                        "limit": 30.0},
            "search": {"accelerators": [[family] for family in
                                        sorted({f for setting in settings.values() for f in setting})]},
            "space": {} if model == "builtin:tiny-flux" else {"tgate": {"gate_step": [2, steps - 2]}}})
        pipe = load_pipeline(model, device="cpu", dtype="float32")
        evaluator = evaluator_from_spec(spec, pipe=pipe)
        clock = time.perf_counter()
        baseline = evaluator.baseline()
        print(f"{how}: baseline {baseline.seconds_per_image:.3f} s/image "
              f"({time.perf_counter() - clock:.1f} s with its warm-up)", flush=True)
        for name, setting in settings.items():
            try:
                result = evaluator.compare(setting, baseline)
            except Exception as error:  # a family that cannot run compiled: say why
                rows[name] += ["failed: " + str(error).splitlines()[0][:60]] + (
                    ["-"] * 3 if how == "regional" else [])
                continue
            rows[name].append(f"{result.speedup_interval} {result.interval('psnr').mean:.1f} dB")
            if how == "regional":
                rows[name] += [f"{result.warmup_seconds:.1f}", str(result.graph_breaks),
                               str(result.compiled_while_timed)]
            print(f"  {name}: {result.speedup_interval}", flush=True)
    print(f"\n# families under torch.compile (regional, {backend}) on {model}, {steps} steps, "
          f"4 prompts in batches of 2 ({machine()})")
    print(table(["setting", "eager: speedup, psnr", "compiled: speedup, psnr", "warm-up s (compile)",
                 "graph breaks", "graphs compiled while timed"], list(rows.values())))
    print(f"{time.perf_counter() - started:.0f} s in all")
