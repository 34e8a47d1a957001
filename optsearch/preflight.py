"""`optsearch check SPEC`: load what a study needs, time one baseline batch, and say what the
study will cost before any device hour is spent.

Every problem found becomes one line (exit 2); a spec that passes prints the device, dtype,
seconds per image, peak memory against what is free, the prompts, and an estimate of the study's
duration for 1 and N workers. `run` and `worker` print the same estimate once their baseline is
timed (`estimate_text`).
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass, field

import torch

# Trials run between the baseline's speed (1x: nothing gained) and about twice as fast (what
# DeepCache, TaylorSeer or half the steps give at the limits studies set): an honest range.
EXPECTED_SPEEDUPS = (1.0, 2.0)


@dataclass
class Estimate:
    """The study's duration from one measured seconds-per-image, for 1 and `workers` workers."""

    seconds_per_image: float
    n_trials: int
    num_samples: int
    workers: int = 1

    def per_trial(self, speedup: float) -> float:
        """One trial: a short warm-up plus every prompt at `speedup`, scoring not counted."""
        return self.num_samples * self.seconds_per_image / speedup * 1.1

    @property
    def baseline_seconds(self) -> float:
        return self.num_samples * self.seconds_per_image

    def total(self, workers: int) -> tuple[float, float]:
        """(fastest, slowest) wall seconds: each worker times its own baseline, then shares the
        trials; trials are whole units, so the slowest worker takes the rounded-up share."""
        share = math.ceil(self.n_trials / workers)
        fast, slow = (self.baseline_seconds + share * self.per_trial(s)
                      for s in reversed(EXPECTED_SPEEDUPS))
        return fast, slow


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_text(estimate: Estimate) -> str:
    """One line: the study's duration on 1 worker and on N, trials x prompts x s/image."""
    low, high = estimate.total(1)
    text = (f"estimate: {estimate.n_trials} trials x {estimate.num_samples} prompts x "
            f"{estimate.seconds_per_image:.3g} s/image at {EXPECTED_SPEEDUPS[1]:g}x-"
            f"{EXPECTED_SPEEDUPS[0]:g}x: {_duration(low)}-{_duration(high)} on 1 worker")
    if estimate.workers > 1:
        low, high = estimate.total(estimate.workers)
        text += f", {_duration(low)}-{_duration(high)} on {estimate.workers}"
    return text + " (early stop and reuse make it shorter)"


@dataclass
class Report:
    """What `check` found: facts to print, and problems (each one line)."""

    facts: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _memory(device: torch.device) -> tuple[float | None, float | None]:
    """(peak GiB used by this process on `device`, GiB free there now)."""
    gib = 1024 ** 3
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return torch.cuda.max_memory_allocated(device) / gib, free / gib
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib  # KiB on Linux
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / gib
    except (ValueError, OSError):
        available = None
    return peak, available


def check(spec, device: str | None = None, workers: int | None = None) -> Report:
    """Load the spec's pipeline, CLIP and prompts, time one baseline batch; collect problems.
    `workers`: the N of the estimate (default: the GPUs here, at least 1)."""
    from .errors import exit_code_for
    from .evaluate import GenerationConfig, generate, pipeline_from_spec
    from .prompts import load_prompts
    from .quality import ClipScorer

    report = Report()
    if workers is None:
        workers = max(1, torch.cuda.device_count() if torch.cuda.is_available() else 0)

    def attempt(what: str, load):
        try:
            return load()
        except Exception as error:  # every loader failure becomes one line
            text = str(error).strip().splitlines()[0] if str(error).strip() else ""
            if exit_code_for(error) != 2:
                text = f"{type(error).__name__}: {text}"
            report.problems.append(f"{what}: {text}")
            return None

    prompts = attempt("prompts", lambda: load_prompts(
        spec.prompts.source, spec.prompts.num_samples, spec.prompts.seed, spec.prompts.shuffle,
        spec.prompts.column))
    pipe = attempt("model", lambda: pipeline_from_spec(spec, device))
    if pipe is not None:
        report.facts.update(device=str(pipe.device),
                            dtype=str(pipe.dtype).removeprefix("torch."))
    scorer = attempt("quality.clip_model", lambda: ClipScorer(
        spec.quality.clip_model, spec.quality.clip_pretrained,
        pipe.device if pipe is not None else "cpu"))
    if prompts is not None:
        report.facts.update(prompts=len(prompts), sample=prompts[0])
    if pipe is None or prompts is None or scorer is None or report.problems:
        return report
    config = GenerationConfig.from_spec(spec)
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    start = time.perf_counter()
    batch = attempt("baseline batch", lambda: next(iter(generate(
        pipe, prompts[:config.batch_size], config, warmup=True))))
    if batch is None:
        report.problems[-1] += (f" (prompts.batch_size={config.batch_size}: lower it, or run "
                                "workers with --halve-batch-on-oom)")
        return report
    attempt("quality.clip_model", lambda: scorer.score(batch.images, prompts[:len(batch.images)]))
    peak, free = _memory(pipe.device)
    estimate = Estimate(batch.seconds_per_image, spec.search.n_trials, len(prompts), workers)
    report.facts.update(batch_size=config.batch_size, seconds_per_image=batch.seconds_per_image,
                        check_seconds=time.perf_counter() - start, peak_gib=peak, free_gib=free,
                        estimate=estimate)
    return report


def format_report(report: Report, spec) -> str:
    facts = report.facts
    lines = [f"model {spec.model.id} on {facts['device']} ({facts['dtype']}); "
             f"{spec.search.model_kind} pipeline",
             f"prompts: {facts['prompts']} from {spec.prompts.source}, e.g. {facts['sample']!r}",
             f"baseline: {facts['seconds_per_image']:.3g} s/image at batch size "
             f"{facts['batch_size']}, {spec.model.steps} steps"]
    peak, free = facts["peak_gib"], facts["free_gib"]
    lines.append(f"memory: peak {peak:.2f} GiB"
                 + (f", {free:.1f} GiB free now" if free is not None else ""))
    lines.append(estimate_text(facts["estimate"]))
    lines.append("ready: a study of this spec can run")
    return "\n".join(lines)
