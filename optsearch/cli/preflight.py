"""`optsearch check SPEC`: load what a study needs, time one baseline batch, and say what the
study will cost before any device hour is spent.

Every problem found becomes one line (exit 2); a spec that passes prints the device, dtype,
seconds per image, peak memory against what is free, the prompts, and an estimate of the study's
duration for 1 and N workers. `run` and `worker` print the same estimate once their baseline is
timed (`estimate_text`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from optsearch.accelerators import (
    attention_of,
    calibrate_under_each,
    calibrated_range,
    call_steps,
    dbcache,
    execution_device,
    offload_of,
    pab,
    params_of,
    quantization_of,
    scheduler_of,
    tome,
)
from optsearch.cli.memory_facts import (
    factor_bytes,
    factors_text,
    fused_copy_bytes,
    fused_copy_text,
    host_available_gib,
    memory_now,
)
from optsearch.deployment import context_text, measured_context, output_size
from optsearch.errors import error_text, exit_code_for, out_of_memory
from optsearch.formatting import auto_range_details, auto_range_text
from optsearch.measure.compiling import compiled_as
from optsearch.measure.faults import fault_from_env
from optsearch.measure.frames import clip_score
from optsearch.measure.generation import GenerationConfig, check_conditioning, generate
from optsearch.measure.long_prompts import long_prompts_note
from optsearch.measure.prompts import confirm_asked, confirm_prompts, prompts_of, reference_images
from optsearch.measure.quality import ClipScorer
from optsearch.measure.served import pipeline_from_spec
from optsearch.optimize.baseline import ABOVE_LIMIT
from optsearch.optimize.estimate import Estimate, estimate_text, expected_speedups
from optsearch.optimize.space import computations, trials_possible
from optsearch.optimize.warm_start import published_settings, trial_params


@dataclass
class Report:
    """What `check` found: facts to print, and problems (each one line)."""

    facts: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def check(spec, device: str | None = None, workers: int | None = None) -> Report:
    """Load the spec's pipeline, CLIP and prompts, time one baseline batch; collect problems.
    `workers`: the N of the estimate (default: the GPUs here, at least 1)."""
    report = Report()
    failures: list[Exception] = []
    if workers is None:
        workers = max(1, torch.cuda.device_count() if torch.cuda.is_available() else 0)

    def attempt(what: str, load):
        try:
            return load()
        except Exception as error:  # every loader failure becomes one line
            failures.append(error)
            text = error_text(error)
            if exit_code_for(error) != 2:
                text = f"{type(error).__name__}: {text}"
            report.problems.append(text if text.startswith(f"{what} ") else f"{what}: {text}")  # once
            return None

    prompts = attempt("prompts", lambda: prompts_of(spec.prompts))
    if prompts is not None and confirm_asked(spec):  # they come after the search's prompts
        attempt("confirm", lambda: confirm_prompts(spec))
    pipe = attempt("model", lambda: pipeline_from_spec(spec, device))
    if pipe is not None:
        report.facts.update(device=str(execution_device(pipe)), offload=offload_of(pipe),
                            attention=attention_of(pipe), scheduler=scheduler_of(pipe),
                            quantization=quantization_of(pipe),
                            dtype=str(pipe.dtype).removeprefix("torch."),
                            denoising={count: call_steps(pipe, {"num_inference_steps": count,
                                                                "strength": spec.model.strength})
                                       for count in _step_counts(spec)})
    scorer = attempt("quality.clip_model", lambda: ClipScorer(
        spec.quality.clip_model, spec.quality.clip_pretrained,
        execution_device(pipe) if pipe is not None else "cpu"))
    if spec.quality.measures_lpips:
        from optsearch.measure.perceptual import check_alexnet_weights

        attempt("quality.lpips", check_alexnet_weights)
    if prompts is not None:
        images = reference_images(prompts[0])  # an image-conditioned pipeline's input(s)
        mask = getattr(prompts[0], "mask", None)  # an inpainting one's region to fill
        report.facts.update(prompts=len(prompts), sample=prompts[0],
                            image_sizes=[image.size for image in images],
                            mask_share=None if mask is None else _white_share(mask))
        if pipe is not None:
            report.facts["long_prompts"] = long_prompts_note(pipe, prompts)
            attempt("prompts", lambda: check_conditioning(pipe, prompts, spec.prompts.batch_size))
    if pipe is None or prompts is None or scorer is None or report.problems:
        return report
    config = GenerationConfig.from_spec(spec)
    device = execution_device(pipe)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    compiled, warm, fault = compiled_as(pipe), {}, fault_from_env()
    batch = attempt("baseline batch", lambda: next(iter(generate(  # compiled: every path first
        pipe, prompts[:config.batch_size], config, warmup=config.steps if compiled else True,
        on_warmup=lambda seconds: warm.update(seconds=seconds),
        fault=fault and (lambda index: fault("baseline", index))))))
    if batch is None:
        if out_of_memory(failures[-1]):
            report.problems[-1] += (f" (prompts.batch_size={config.batch_size}: lower it, or run "
                                    "workers with --halve-batch-on-oom)")
        return report
    attempt("quality.clip_model", lambda: clip_score(scorer, batch.images,
                                                     prompts[:len(batch.images)]))
    report.facts["auto_ranges"] = attempt("auto ranges", lambda: _auto_ranges(spec, pipe, prompts,
                                                                              config)) or {}
    if any("tome" in combo for combo in spec.search.combos):
        report.facts["tome_tokens"] = attempt("tome tokens", lambda: tome.measure_tokens(
            pipe, lambda: list(generate(pipe, prompts[:1], replace(config, steps=config.steps_denoising(2)),
                                        warmup=False))))
    measured = {"tome": report.facts.get("tome_tokens") or {}}  # what tells settings apart here
    if {"pab", "fastercache"} & set(spec.accelerators_used):  # one image, as a worker measures it
        timesteps = attempt("timesteps", lambda: pab.measure_timesteps(
            pipe, config.steps, lambda: list(generate(pipe, prompts[:1], config, warmup=False)))) or {}
        measured.update(pab=timesteps, fastercache=timesteps)
    if "taylorseer" in spec.accelerators_used:  # the memory its factors add, at this batch
        order = max(spec.searched_values("taylorseer")["max_order"])
        report.facts["taylorseer_factors"] = attempt("taylorseer factors", lambda: {
            lite: factor_bytes(pipe, prompts[:config.batch_size], config, order, lite)
            for lite in spec.param_range("taylorseer", "use_lite_mode")})
        report.facts["taylorseer_order"] = order
    report.facts["computations"] = computations(spec, measured)
    report.facts["given_ranges"] = attempt("given threshold ranges", lambda: _auto_ranges(
        spec, pipe, prompts, config, _given_thresholds(spec))) or {}
    if "distill" in spec.accelerators_used:  # the host memory a fused LoRA's copy takes
        report.facts.update(fused_copy_bytes=attempt("distill", lambda: fused_copy_bytes(pipe, spec)),
                            host_available_gib=host_available_gib())
    peak, free = memory_now(device)
    trials = trials_possible(spec, report.facts["computations"])  # counted once, above
    estimate = Estimate(batch.seconds_per_image, trials, len(prompts), workers,
                        compile_seconds=warm.get("seconds", 0.0) if compiled else 0.0,
                        calibration_images=config.batch_size * spec.calibration_calls(),
                        speedups=expected_speedups(spec))
    report.facts.update(compiled=compiled, warmup_seconds=warm.get("seconds"),
                        batch_size=config.batch_size, seconds_per_image=batch.seconds_per_image,
                        size=output_size(batch.images),
                        true_cfg_scale=config.true_cfg_ran(pipe),
                        check_seconds=time.perf_counter() - start, peak_gib=peak, free_gib=free,
                        estimate=estimate)
    return report


def _given_thresholds(spec) -> list[tuple[str, str]]:
    """(family, parameter) of each threshold the spec gives a range of its own (not "auto")."""
    return [(family, param) for family in spec.accelerators_used
            for param, declared in params_of(family).items()
            if declared.calibrated and len(spec.param_range(family, param)) > 1
            and spec.space_value(family, param) not in (None, "auto")]


def _auto_ranges(spec, pipe, prompts, config, params=None) -> dict[str, list]:
    """The "auto" ranges of `params` (default: the spec's "auto" ones) as a worker on this device
    would calibrate them (plain calls on the search's first batch, on each model its trials run)."""
    ranges = {}
    for family, param in spec.auto_params() if params is None else params:
        measured = calibrate_under_each(
            family, pipe, lambda steps, under: list(generate(
                pipe, prompts[:config.batch_size], replace(config, steps=steps), under, warmup=False)),
            spec.searched_values(family), spec.calibration_conditions(family),
            config.guidance_kwargs(min(config.batch_size, len(prompts)), pipe))
        if param in measured.get("auto", {}):
            ranges[f"{family}.{param}"] = calibrated_range(family, measured, param)  # per Fn too
    return ranges


def _tome_text(spec, measured: dict | None) -> list[str]:
    """Where this UNet has attention for ToMe to merge in, and the `max_downsample` values the
    spec searches that reach none of it (each such trial times the baseline plus a patch)."""
    if not measured or not measured.get("tokens"):
        return []
    levels = ", ".join(f"{level}x ({count} tokens)" for level, count in measured["tokens"].items())
    lines = [f"tome: attention at {levels} downsampling on this UNet"]
    warning = tome.idle_warning(measured, spec.searched_values("tome").get("max_downsample", []))
    return lines + ([warning] if warning else [])


def _computations_text(spec, count: int | None) -> list[str]:
    """How many distinct computations the space holds here, where its families can tell, and
    whether n_trials asks for more than there are."""
    if count is None:
        return []
    lines = [f"space: {count} distinct computations on this device (settings that compute the same "
             "count once)"]
    if spec.search.n_trials > count:
        lines.append(f"note: search.n_trials = {spec.search.n_trials} is more than the {count} distinct "
                     "computations here: the study stops once each is measured (the space is exhausted)")
    return lines


def _published_outside(spec, ranges: dict[str, list]) -> list[str]:
    """A line for each published warm-start value of an "auto" parameter outside the range
    measured here: those trials sample it within the range (optimize/space.py) instead."""
    if "published" not in spec.search.warm_start or spec.search.sampler == "grid":
        return []
    outside: dict[str, set] = {}
    for setting in published_settings(spec):
        enqueued = trial_params(spec, setting, clip=False) or {}  # what `study create` enqueues
        for name, (low, high) in ranges.items():
            value = enqueued.get(name)
            if value is not None and not low <= value <= high:
                outside.setdefault(name, set()).add(value)
    return [f"warm start: the published {name} = {', '.join(map(str, sorted(values)))} lies "
            "outside that range here (it would skip nothing, or all it can): those trials sample "
            "it within the range" for name, values in outside.items()]


def _given_outside(spec, calibrated: dict[str, list]) -> list[str]:
    """A line for each threshold range the spec gives that lies partly outside the one measured
    here: its trials there skip nothing (below) or all they can (above)."""
    lines = []
    for name, (low, high) in calibrated.items():
        given_low, given_high = spec.param_range(*name.split("."))[:2]
        width = given_high - given_low
        below = max(0.0, min(given_high, low) - given_low) / width if width else float(given_low < low)
        above = max(0.0, given_high - max(given_low, high)) / width if width else float(given_high > high)
        if below or above:
            lines.append(f"space.{name} = [{given_low}, {given_high}]: on this device thresholds skip "
                         f"some steps and not all they can in [{low}, {high}]; {below:.0%} of the "
                         f"given range lies below it (skips nothing) and {above:.0%} above it "
                         "(skips all it can): leave the range out to search \"auto\"")
    return lines


def _step_counts(spec) -> list[int]:
    """The step counts the study's calls run: the model's, and the fewest a `steps` combo runs
    (with DBCache too: its steps masks are told there)."""
    counts = (spec.model.steps, spec.fewest_steps(), spec.fewest_steps("dbcache"))
    return list(dict.fromkeys(count for count in counts if count is not None))


def _denoising_text(spec, facts) -> str:
    """' (9 of them denoise, at strength 0.55)' for image-to-image: what step counts count."""
    if spec.model.strength is None:
        return ""
    return (f" ({facts['denoising'][spec.model.steps]} of them denoise, at strength "
            f"{spec.model.strength})")


def _masks_text(spec, denoising: dict[int, int]) -> list[str]:
    """What each cache-dit steps mask the spec searches computes, at the model's steps and the
    fewest a `steps` + dbcache combo runs (`denoising`: each count's steps that denoise, those an
    image-to-image call runs at its strength): the names alone do not say (cache-dit scales its
    28-step tables, unevenly: "fast" computes 6 of 16 steps and 11 of 28)."""
    if "dbcache" not in spec.accelerators_used:
        return []
    masks = [mask for mask in spec.param_range("dbcache", "steps_computation_mask") if mask != "none"]
    counts = [denoising[spec.model.steps]]
    fewest = spec.fewest_steps("dbcache")
    if masks and fewest is not None:
        counts.append(denoising[fewest])
    said = "denoising steps" if spec.model.strength is not None else "steps"
    return [f"cache-dit steps masks at {count} {said}, steps computed in full: "
            + ", ".join(f"{mask} {sum(dbcache.steps_mask(mask, count))}" for mask in masks)
            + f" (of {count}; on the others \"static\" uses the cache, \"dynamic\" lets the "
              "threshold decide)" for count in dict.fromkeys(counts)
            if masks]


def _shortened(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _images_text(sizes: list | None, what: str = "reference") -> str:
    """' with an image of 64x64 px', or a multi-reference prompt's ' with 2 reference images of
    64x64, 32x48 px' (several ControlNets': 'control images'); '' for a text prompt."""
    listed = ", ".join(f"{width}x{height}" for width, height in sizes or [])
    if not listed:
        return ""
    return f" with an image of {listed} px" if len(sizes) == 1 else \
        f" with {len(sizes)} {what} images of {listed} px"


def format_report(report: Report, spec) -> str:
    facts = report.facts
    names = spec.model.controlnets
    controlnet = (f" with ControlNet{'s' if len(names) > 1 else ''} {', '.join(names)}" if names
                  else "")
    lines = [f"model {spec.model.id}{controlnet} on {facts['device']} ({facts['dtype']}); "
             f"{spec.search.model_kind} pipeline",
             f"prompts: {facts['prompts']} from {spec.prompts.source}, e.g. {_shortened(facts['sample'])!r}"
             + _images_text(facts.get("image_sizes"), "control" if names else "reference")
             + (f" and a mask of {facts['mask_share']:.0%} of it"
                if facts.get("mask_share") is not None else ""),
             f"baseline: {facts['seconds_per_image']:.3g} s/image at batch size "
             f"{facts['batch_size']}, {spec.model.steps} steps" + _denoising_text(spec, facts),
             "deployment context (what the figures will hold for; serve at it): "
             + context_text(measured_context(spec, facts["batch_size"], facts.get("compiled"),
                                          offload=facts.get("offload") or "none",
                                          attention=facts.get("attention"),
                                          scheduler=facts.get("scheduler"),
                                          size=facts.get("size"),
                                          quantization=facts.get("quantization") or "none",
                                          true_cfg_scale=facts.get("true_cfg_scale")))]
    if facts.get("long_prompts"):
        lines.insert(2, facts["long_prompts"])
    if facts.get("compiled"):
        lines.insert(2, f"compiled ({facts['compiled']}): the first call compiled it in "
                        f"{facts['warmup_seconds']:.1f} s, not in the baseline's seconds (each "
                        "setting compiles again in its own untimed warm-up)")
    peak, free = facts["peak_gib"], facts["free_gib"]
    lines.append(f"memory: peak {peak:.2f} GiB"
                 + (f", {free:.1f} GiB free now" if free is not None else ""))
    limit = spec.objective.max_memory_gib
    if limit is not None and peak is not None and peak > limit:
        lines.append(f"memory: the plain pipeline already peaks above objective.max_memory_gib = "
                     f"{limit}: {ABOVE_LIMIT}")
    for name, calibrated in facts["auto_ranges"].items():
        lines.append(f"auto range {name}: [{calibrated[0]}, {calibrated[1]}] on this device "
                     f"({auto_range_text(name)})")
        lines += auto_range_details(calibrated.by, {count: (fewer, fewer.by)
                                                    for count, fewer in calibrated.at_steps.items()},
                                    facts["denoising"][spec.model.steps],
                                    {lora: (list(distilled), distilled.by)
                                     for lora, distilled in calibrated.under.items()})
    lines += factors_text(facts, free)
    lines += fused_copy_text(facts)
    lines += _tome_text(spec, facts.get("tome_tokens"))
    lines += _computations_text(spec, facts.get("computations"))
    lines += _masks_text(spec, facts["denoising"])
    lines += _published_outside(spec, facts["auto_ranges"])
    lines += _given_outside(spec, facts.get("given_ranges", {}))
    lines.append(estimate_text(facts["estimate"]))
    lines.append("ready: a study of this spec can run")
    return "\n".join(lines)


def _white_share(mask) -> float:
    """The share of a mask's pixels to fill (white, over half grey)."""
    histogram = mask.histogram()
    return sum(histogram[128:]) / max(1, sum(histogram))
