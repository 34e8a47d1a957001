"""Checking a spec across its fields, and a setting against a spec: one line per problem."""

from __future__ import annotations

import math
import os

from optsearch.accelerators import (
    KINDS,
    ORDER,
    combo_name,
    combo_problem,
    dbcache,
    denoised_steps,
    pab,
    params_of,
    step_problems,
)
from optsearch.measure.model_ids import is_factory
from optsearch.measure.prompts import is_folder
from optsearch.study_spec.distill_checks import check_distill, distill_notes
from optsearch.study_spec.schema import (
    COMPILES,
    DTYPES,
    KNOWN_SCHEDULERS,
    METRICS,
    MODES,
    PROMPT_FILE_SUFFIXES,
    PROMPT_SOURCES,
    RULES,
    SAMPLERS,
    STATISTICS,
    StudySpec,
)


def guidance_problem(accelerators, guidance_scale: float) -> str | None:
    """T-GATE caches the attention of the guided half: without guidance it breaks or mixes prompts."""
    if "tgate" in accelerators and guidance_scale <= 1:
        return ("tgate needs classifier-free guidance: model.guidance_scale is "
                f"{guidance_scale}, must be > 1")
    return None


FEW_BATCHES = 4  # a pass of fewer batches leaves a speedup interval few degrees of freedom


def notes(spec: StudySpec) -> list[str]:
    """What a valid spec will do that its user may not expect: one line each, printed by `run`,
    `check` and `study create` (not problems: the study runs)."""
    lines = []
    if spec.quality.clip_pretrained == "none":
        lines.append(f"{spec.name} scores with a random-weight CLIP (clip_pretrained = \"none\"): "
                     f"CLIP scores mean nothing here, so it constrains {spec.quality.metric} "
                     "(fidelity to the baseline) instead" if spec.quality.metric != "clip_loss"
                     else "random-weight CLIP: the CLIP loss it constrains is meaningless")
    batches = math.ceil(spec.prompts.num_samples / spec.prompts.batch_size)
    if batches < FEW_BATCHES:
        lines.append(f"prompts.num_samples = {spec.prompts.num_samples} in batches of "
                     f"{spec.prompts.batch_size} is {batches} batch{'es' if batches > 1 else ''} "
                     f"a pass: one slow batch can leave every speedup \"not measured enough to "
                     f"tell\"; {FEW_BATCHES} or more batches (more prompts or a smaller "
                     "prompts.batch_size) give usable intervals")
    if spec.model.lora and not spec.model.fuse_lora:
        lines.append("model.lora is measured as an adapter (its low-rank work at every step, as a "
                     "server that switches LoRAs runs it); set model.fuse_lora = true if you serve "
                     "it fused")
    lines += distill_notes(spec)
    size = spec.space_size()
    if size is not None and size < spec.search.n_trials:
        lines.append(f"the space holds at most {size} distinct settings, fewer than search.n_trials = "
                     f"{spec.search.n_trials}: the search ends when every one is tried (a repeat "
                     "copies its result for free)")
    return lines


def validate(spec: StudySpec, problem) -> None:
    """Cross-field checks, after every key has the right type."""
    model, prompts, quality = spec.model, spec.prompts, spec.quality
    objective, search = spec.objective, spec.search
    if model.kind not in ("auto", *KINDS):
        problem("model.kind", f"unknown kind {model.kind!r} (allowed: auto, {', '.join(KINDS)})")
    if model.dtype not in DTYPES:
        problem("model.dtype", f"unknown dtype {model.dtype!r} (allowed: {', '.join(DTYPES)})")
    if check_device(model.device):
        problem("model.device", check_device(model.device))
    if model.scheduler is not None:
        name = model.scheduler.removesuffix("Scheduler")
        if name not in KNOWN_SCHEDULERS:
            problem("model.scheduler",
                    f"unknown scheduler {model.scheduler!r} (allowed: {', '.join(KNOWN_SCHEDULERS)})")
    if model.steps < 1:
        problem("model.steps", "must be >= 1")
    if model.strength is not None and not 0 < model.strength <= 1:
        problem("model.strength", f"{model.strength} must be in (0, 1]")
    elif model.strength is not None and model.steps >= 1 and model.denoising_steps < 1:
        problem("model.strength", f"{model.strength} of model.steps={model.steps} denoises no "
                f"step: raise either")
    for key in ("height", "width"):
        size = getattr(model, key)
        if size is not None and (size < 8 or size % 8):
            problem(f"model.{key}", f"{size} must be a multiple of 8, at least 8")
    if model.num_frames is not None and model.num_frames < 1:
        problem("model.num_frames", f"{model.num_frames} must be >= 1")
    elif model.num_frames is not None and search.model_kind != "video" and not is_factory(model.id):
        problem("model.num_frames", f"applies to video pipelines; {model.id!r} was told to be a "
                f"{search.model_kind} pipeline (set model.kind = \"video\" if it makes videos)")
    if not 1 <= model.fps <= 120:
        problem("model.fps", f"{model.fps} must be in [1, 120]")
    if not model.guidance_scale >= 0:
        problem("model.guidance_scale", "must be >= 0")
    if model.guidance_scale_2 is not None and not model.guidance_scale_2 >= 0:
        problem("model.guidance_scale_2", "must be >= 0")
    elif model.guidance_scale_2 is not None and search.model_kind != "video" and not is_factory(model.id):
        problem("model.guidance_scale_2", f"applies to Wan 2.2's two-expert video pipelines; "
                f"{model.id!r} was told to be a {search.model_kind} pipeline")
    if model.true_cfg_scale is not None and model.true_cfg_scale > 1 and model.negative_prompt is None:
        problem("model.true_cfg_scale", f"{model.true_cfg_scale} runs no guidance without a "
                "negative prompt (true CFG needs one: set model.negative_prompt, e.g. \" \")")
    if model.controlnet is not None and (model.id.startswith("builtin:") or is_factory(model.id)):
        problem("model.controlnet", f"applies to a hub id or folder; {model.id!r} builds its own "
                "pipeline (with its ControlNet, if any)")
    elif model.controlnet is not None and model.strength is not None:
        problem("model.controlnet", "with model.strength is not covered: a ControlNet "
                "image-to-image call takes an image and a control image, and each prompt has one")
    if model.lora is not None and is_factory(model.id):
        problem("model.lora", f"applies to a hub id, folder or builtin; {model.id!r} builds its own "
                "pipeline (load or fuse the LoRA there)")
    for key, unset in (("lora_weight_name", model.lora_weight_name is None),
                       ("lora_scale", model.lora_scale == 1.0), ("fuse_lora", not model.fuse_lora)):
        if model.lora is None and not unset:
            problem(f"model.{key}", "applies with model.lora (the LoRA it is for)")
    if len(model.lora_sources) > 1 and model.lora_weight_name is not None:
        problem("model.lora_weight_name", "applies to one LoRA; with several, name each one's "
                ".safetensors file in model.lora")
    count = len(model.lora_sources)
    if count and isinstance(model.lora_scale, list) and len(model.lora_scale) != count:
        problem("model.lora_scale", f"gives {len(model.lora_scale)} scales for {count} LoRAs "
                "(model.lora): one each, in order")
    if len(model.controlnets) > 1:
        scales = model.call.get("controlnet_conditioning_scale")
        if isinstance(scales, list) and len(scales) != len(model.controlnets):
            problem("model.call.controlnet_conditioning_scale", f"gives {len(scales)} scales for "
                    f"{len(model.controlnets)} ControlNets (model.controlnet): one each, in order")
        if prompts.batch_size > 1:
            problem("prompts.batch_size", f"{prompts.batch_size}: several ControlNets "
                    "(model.controlnet) run one prompt a call, as diffusers' pipelines nest a "
                    "batch's control images differently: set prompts.batch_size = 1")
    if model.compile not in COMPILES:
        problem("model.compile", f"unknown compile {model.compile!r} (allowed: {', '.join(COMPILES)})")
    if not model.id:
        problem("model.id", "must name a model: hub id, local folder or builtin:tiny")
    if prompts.num_samples < 1:
        problem("prompts.num_samples", f"{prompts.num_samples} must be >= 1")
    if prompts.batch_size < 1:
        problem("prompts.batch_size", f"{prompts.batch_size} must be >= 1")
    for key, seed in (("prompts.seed", prompts.seed), ("search.seed", search.seed)):
        if seed is not None and not 0 <= seed < 2**32:  # what datasets and numpy seed with
            problem(key, f"{seed} must be in [0, 2**32 - 1]")
    _check_source("prompts.source", prompts.source, problem)
    if prompts.image_column is not None and not prompts.image_column.strip():
        problem("prompts.image_column", "must name a column")
    elif prompts.image_column is not None and prompts.source in PROMPT_SOURCES:
        problem("prompts.image_column", f"prompt set {prompts.source!r} holds no images: name a "
                "prompt file whose column holds image paths, or a folder of images")
    if prompts.mask_column is not None and not prompts.mask_column.strip():
        problem("prompts.mask_column", "must name a column")
    elif prompts.mask_column is not None and prompts.source in PROMPT_SOURCES:
        problem("prompts.mask_column", f"prompt set {prompts.source!r} holds no masks: name a "
                "prompt file whose columns hold image and mask paths, or a folder of images")
    elif prompts.mask_column is not None and prompts.image_column is None \
            and not is_folder(prompts.source):
        problem("prompts.mask_column", "needs prompts.image_column: the image each mask belongs to")
    if quality.metric not in METRICS:
        problem("quality.metric", f"unknown metric {quality.metric!r} (allowed: {', '.join(METRICS)})")
    elif quality.metric == "ssim" and not -1 <= quality.limit <= 1:
        problem("quality.limit", f"{quality.limit} is not an SSIM (allowed: -1..1)")
    elif quality.metric == "lpips" and not 0 < quality.limit <= 1:
        problem("quality.limit", f"{quality.limit} is not an LPIPS distance limit (allowed: (0, 1]; "
                "0 is identical, typical limits 0.05-0.3)")
    elif quality.metric == "psnr" and quality.limit < 1:
        problem("quality.limit", f"{quality.limit} dB is below any meaningful PSNR (limits are "
                "typically 25-45 dB; a CLIP-loss limit needs metric = \"clip_loss\")")
    if not math.isfinite(quality.limit):
        problem("quality.limit", "must be a finite number")
    if not 0.5 <= quality.confidence < 1:
        problem("quality.confidence", "must be in [0.5, 1)")
    if quality.statistic not in STATISTICS:
        problem("quality.statistic", f"unknown statistic {quality.statistic!r} (allowed: "
                f"{', '.join(STATISTICS)})")
    elif quality.statistic != "mean" and objective.mode == "target-speedup":
        problem("quality.statistic", "applies to the quality limit; in target-speedup mode quality "
                "is the objective (set objective.mode = \"max-speedup\" or statistic = \"mean\")")
    elif quality.statistic != "mean" and quality.rule == "bound":
        problem("quality.rule", f"\"bound\" is the confidence bound of the mean; with statistic "
                f"\"{quality.statistic}\" the prompts' own figures meet the limit (rule = \"mean\")")
    if quality.rule not in RULES:
        problem("quality.rule", f"unknown rule {quality.rule!r} (allowed: {', '.join(RULES)})")
    if objective.max_memory_gib is not None and not objective.max_memory_gib > 0:
        problem("objective.max_memory_gib", f"{objective.max_memory_gib} must be > 0 (GiB of peak "
                "device memory: GPU memory allocated on CUDA, the process's resident set on a CPU)")
    if objective.mode not in MODES:
        problem("objective.mode", f"unknown mode {objective.mode!r} (allowed: {', '.join(MODES)})")
    elif objective.mode == "target-speedup":
        if objective.target_speedup is None:
            problem("objective.target_speedup", "is required when mode is target-speedup")
        elif objective.target_speedup <= 0:
            problem("objective.target_speedup", "must be > 0")
    if search.sampler not in SAMPLERS:
        problem("search.sampler", f"unknown sampler {search.sampler!r} (allowed: {', '.join(SAMPLERS)})")
    if search.n_trials < 1:
        problem("search.n_trials", "must be >= 1")
    if search.min_batches < 1:
        problem("search.min_batches", "must be >= 1")
    if not 0 <= search.stop_margin < 1:
        problem("search.stop_margin", f"{search.stop_margin} must be in [0, 1) (a share: 0.05 = 5 %)")
    if search.n_startup_trials < 0:
        problem("search.n_startup_trials", "must be >= 0")
    if search.probe_every < 0:
        problem("search.probe_every", "must be >= 0 (0: no probes; the pass_noise prior stays)")
    if not 0 <= search.pass_noise < 1:
        problem("search.pass_noise", f"{search.pass_noise} must be in [0, 1) (a share: 0.05 = 5 %)")
    if search.retime_baseline_every < 0:
        problem("search.retime_baseline_every", "must be >= 0 (0: time the baseline once per worker)")
    for source in search.warm_start:
        if source != "published" and not (source.startswith("study:") and source[6:].strip()):
            problem("search.warm_start", f"unknown warm start {source!r} (allowed: \"published\", "
                    "\"study:NAME\")")
    confirm = spec.confirm
    if confirm.num_samples is not None and confirm.num_samples < 1:
        problem("confirm.num_samples", f"{confirm.num_samples} must be >= 1")
    if confirm.source is not None:
        _check_source("confirm.source", confirm.source, problem)
    if search.accelerators != "any":
        named = [n for c in search.accelerators for n in ([c] if isinstance(c, str) else c)]
        unknown = [name for name in named if name not in ORDER]
        if unknown:
            problem("search.accelerators", f"unknown accelerator {unknown[0]!r} "
                    f"(allowed: {', '.join(ORDER)}, or \"any\")")
            return
        if not search.accelerators or not all(search.combos):
            problem("search.accelerators", 'must name at least one accelerator, or "any"')
            return
    repeated = sorted({combo_name(c) for c in search.combos if search.combos.count(c) > 1})
    if repeated:
        problem("search.accelerators", f"combo {', '.join(repeated)} is listed more than once")
    kind = search.model_kind
    for combo in search.combos:
        why = combo_problem(combo, kind)
        if "distill" in combo and "steps" not in combo:  # a setting may apply it alone
            why = (f"distill runs with steps: a step-distilled LoRA is made for a few steps (got "
                   f"{combo_name(combo)}; search {combo_name([*combo, 'steps'])} and give "
                   "space.distill.num_inference_steps)")
        if why:
            problem("search.accelerators", why)
            return
    used = spec.accelerators_used
    for accelerator in spec.space:
        if accelerator not in used:
            problem(f"space.{accelerator}",
                    f"is not searched (search.accelerators is "
                    f"{', '.join(combo_name(c) for c in search.combos) or 'empty'})")
    if guidance_problem(used, model.guidance_scale):
        problem("search.accelerators", guidance_problem(used, model.guidance_scale))
    if "distill" in used:
        check_distill(spec, problem)
    for accelerator in used:
        for name, declared in params_of(accelerator).items():
            counted = declared.counts_steps or declared.scales_with_steps
            given = name in spec.space.get(accelerator, {})  # defaults fit the steps
            bounds = spec.param_range(accelerator, name)
            # fewer steps counts the call's steps; the others the steps that denoise
            most = model.steps if accelerator == "steps" else model.denoising_steps
            if counted and given and most >= 1 and any(value > most for value in bounds[:2]):
                said = f"model.steps={most}" if accelerator == "steps" else _steps_said(model)
                problem(f"space.{accelerator}.{name}", f"{list(bounds[:2])} goes past {said} "
                        "(allowed: 1..steps)")
    if "pab" in used and (why := pab.window_problem(*(spec.param_range("pab", name)[:2] for name in
                                                         ("timestep_skip_low", "timestep_skip_high")))):
        problem("space.pab", why)
    for combo in search.combos:  # cache-dit's steps masks exist for some step counts only
        if "dbcache" not in combo:
            continue
        counts = {model.steps, *(spec.step_counts(combo) if "steps" in combo else ())}
        why = dbcache.mask_step_problem(spec.param_range("dbcache", "steps_computation_mask"),
                                        {denoised_steps(count, model.strength, model.rounds_up)
                                         for count in counts})
        if why:
            problem("space.dbcache.steps_computation_mask", why)
            break
    if search.sampler == "grid":
        for family, param in spec.auto_params():
            problem(f"space.{family}.{param}", '"auto" is measured by each worker on its device, a '
                    "grid is fixed when the study is created: give it a range [low, high, step]")
    if spec.artifacts.grid_prompts < 0:
        problem("artifacts.grid_prompts", "must be >= 0")
    if "://" not in spec.artifacts.path and os.path.isfile(spec.artifacts.path):
        problem("artifacts.path", f"{spec.artifacts.path} is a file: name a folder")


def _steps_said(model) -> str:
    """'model.steps=50', or at a strength the steps that denoise ('30 denoising steps: ...')."""
    if model.strength is None:
        return f"model.steps={model.steps}"
    return (f"{model.denoising_steps} denoising steps (model.steps={model.steps} at "
            f"strength {model.strength})")


def _check_source(key: str, source: str, problem) -> None:
    if source not in PROMPT_SOURCES and not source.lower().endswith(PROMPT_FILE_SUFFIXES) \
            and not is_folder(source):
        problem(key, f"unknown prompt source {source!r} (allowed: "
                f"{', '.join(PROMPT_SOURCES)}, a {'/'.join(PROMPT_FILE_SUFFIXES)} file, or a "
                "folder of images with a metadata.jsonl)")


def check_device(device: str) -> str | None:
    """Why `device` is not a device name optsearch takes (spec and --device alike), or None."""
    prefix, _, index = device.partition(":")
    if device in ("auto", "cpu", "cuda") or (prefix == "cuda" and index.isdigit()):
        return None
    return f"unknown device {device!r} (allowed: auto, cpu, cuda, cuda:N)"


def check_setting(setting: dict[str, dict], spec: StudySpec) -> list[str]:
    """Problems with running `setting` on the spec's model: its combo must be one the spec
    searches, T-GATE needs guidance, and step-counted parameters must fit in the setting's steps
    (its `steps.num_inference_steps`, else model.steps)."""
    foreign = combo_problem(list(setting), spec.search.model_kind)
    if foreign:
        return [foreign]
    combos = [combo_name(c) for c in spec.search.combos]
    if combo_name(setting) not in combos:
        return [f"the setting is {combo_name(setting)}, which this spec does not search "
                f"(search.accelerators gives: {', '.join(combos)})"]
    problems = step_problems(setting, spec.model.steps, spec.model.strength, spec.model.rounds_up)
    if "pab" in setting:
        window = {**pab.DEFAULTS, **setting["pab"]}
        if why := pab.window_problem(window["timestep_skip_low"], window["timestep_skip_high"]):
            problems.append(why)
    if guidance_problem(setting, spec.model.guidance_scale):
        problems.append(guidance_problem(setting, spec.model.guidance_scale))
    return problems
