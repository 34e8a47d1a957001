"""Optsearch's benchmarks: scripts that print numbers (RESULTS.md holds what they printed).

Run one with `python -m benchmarks NAME [--option VALUE ...]`; `python -m benchmarks --list` lists
them with the question each answers and its RESULTS.md section. Shared code: common.py (machine
facts, scratch folders, a study run to completion) and replay.py (recorded landscapes, one trial
replayed batch by batch).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    module: str
    question: str
    section: str  # its section in benchmarks/RESULTS.md


BENCHMARKS = {
    "overhead": Benchmark("overhead", "What share of a trial's wall time is not inference?",
                          "Trial overhead"),
    "fidelity": Benchmark("fidelity", "Does a study's speedup match standalone timings of the setting?",
                          "Measurement fidelity"),
    "landscape": Benchmark("landscape", "(records) The whole DeepCache+ToMe+T-GATE grid of cpu-bench, "
                           "for search-efficiency", "Search efficiency"),
    "search-efficiency": Benchmark("search_efficiency", "How many trials does each sampler need to "
                                   "find the grid's best?", "Search efficiency"),
    "search-conditional": Benchmark("search_conditional", "Does TPE's group=True find the best of "
                                    "sd15-any's four combos sooner?", "Search efficiency"),
    "repeats": Benchmark("repeats", "What do a sampler's repeats cost a trial budget, and what does "
                         "measuring an unmeasured setting after each give back?", "Search efficiency"),
    "storage": Benchmark("storage", "How many trials a second can SQLite and PostgreSQL take?",
                         "Storage throughput"),
    "study-growth": Benchmark("study_growth", "What does a worker spend on each trial outside the "
                              "pipeline, as the study grows to hundreds of trials?", "Trial overhead"),
    "storage-load": Benchmark("storage_load", "How many workers does PostgreSQL serve, directly and "
                              "through the storage proxy, and what grows with the study?", "Scaling out"),
    "early-stop": Benchmark("early_stop", "How much time does early stop save on a real study?",
                            "Early stop"),
    "gpu-timing": Benchmark("gpu_timing", "Real-size SD 1.5 speedups on a GPU, next to the published "
                            "ones (needs CUDA)", "GPU timing"),
    "gpu-flux": Benchmark("gpu_flux", "diffusers' caches on a full-width FLUX transformer on a GPU "
                          "(needs CUDA)", "GPU timing"),
    "gpu-wan": Benchmark("gpu_wan", "The video caches on a full-width Wan 2.1 transformer at 81 "
                         "frames on a GPU (needs CUDA)", "GPU timing"),
    "speedup-spread": Benchmark("speedup_spread", "How steady is a reported speedup, and does its "
                                "interval cover a repeat?", "Speedup spread and interval coverage"),
    "confirm-coverage": Benchmark("confirm_coverage", "Does a confirmation's speedup interval cover "
                                  "a repeat (A B B A rounds vs pooled batches)?",
                                  "Speedup spread and interval coverage"),
    "search-coverage": Benchmark("search_coverage", "Does a search trial's speedup interval, with "
                                 "the pass term, cover a repeat in a fresh pass?",
                                 "Speedup spread and interval coverage"),
    "inert-steps": Benchmark("inert_steps", "Do steps + DBCache trials between the calibrated step "
                             "counts skip anything?", "Accelerator families"),
    "two-experts": Benchmark("two_experts", "What does a cache gain on Wan 2.2's two experts when it "
                             "acts on both, not the first only?", "Accelerator families"),
    "taylorseer-lite": Benchmark("taylorseer_lite", "What do TaylorSeer's full and lite modes cost in "
                                 "speed, fidelity and the factors they hold?", "Accelerator families"),
    "image-conditioned": Benchmark("image_conditioned", "Do the caches gain as much on an editing "
                                   "pipeline (FLUX Kontext) as on text-to-image?", "Accelerator families"),
    "pab-space": Benchmark("pab_space", "How many computations does PAB's default space hold, and how "
                           "often do draws repeat one?", "Accelerator families"),
    "magcache-range": Benchmark("magcache_range", "How many MagCache trials skip nothing or repeat "
                                "the saturated computation, per threshold range?", "Accelerator families"),
    "steps-mask": Benchmark("steps_mask", "Do cache-dit's static steps masks beat fewer steps with "
                            "as many full computations?", "Accelerator families"),
    "compile-families": Benchmark("compile_families", "Which families survive torch.compile, and "
                                  "their speedup compiled vs eager?", "Accelerator families"),
    "controlnet-compile": Benchmark("controlnet_compile", "How much did an eager ControlNet beside a "
                                    "compiled denoiser cost?", "Accelerator families"),
    "lora": Benchmark("lora", "What does a LoRA kept as an adapter cost per step, and does a "
                      "cache gain the same on it?", "Accelerator families"),
    "distill": Benchmark("distill", "What does a step-distilled LoRA save beyond its fewer steps, "
                         "and what does it cost per step?", "Accelerator families"),
    "warmup": Benchmark("warmup", "Does the short warm-up (or none, in a warm process) time as well "
                        "as a full one?", "Warm-up"),
    "landscape-batches": Benchmark("landscape_batches", "(records) The cpu-bench grid batch by batch, "
                                   "for the replays", "Search cost"),
    "search-cost": Benchmark("search_cost", "Device-seconds to the answer under each early-stop and "
                             "warm-start rule (replayed)", "Search cost"),
    "search-cost-real": Benchmark("search_cost_real", "One real study with the issue-time rules and "
                                  "with today's", "Search cost"),
    "quality-look": Benchmark("quality_look", "How often do the quality looks miss the final mean?",
                              "Search cost"),
    "speedup-look": Benchmark("speedup_look", "How do first batches read, and does the first-batch "
                              "look stop trials at par?", "Search cost"),
    "winners-curse": Benchmark("winners_curse", "How much does the search winner's figure overstate "
                               "a repeat, and what does confirmation fix?",
                               "Winner's curse and confirmation"),
    "inert-ranges": Benchmark("inert_ranges", "How many DBCache trials skip nothing with the default "
                              "threshold range, and with the calibrated (auto) one?",
                              "Accelerator families"),
    "families": Benchmark("families", "Speedup and fidelity of every accelerator family, and fewer "
                          "steps as the reference", "Accelerator families"),
    "twins": Benchmark("twins", "How often does a threshold-cache search time one computation twice, "
                       "and how far apart do its timings read?", "Winner's curse and confirmation"),
}
