"""The deployment context a setting was measured at, and a warning when it is served otherwise.

A cache's speedup and fidelity depend on what the server runs: batch size (a GPU's utilisation),
resolution (token count, attention's share), step count (what a skipped step is worth),
guidance, and whether the denoiser is compiled (a hook weighs more beside compiled blocks). The
study holds them fixed (the spec), `check` prints them, the export records them (`deployment`),
and `optsearch.apply` of an export warns, once each, when a call differs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

from optsearch.accelerators import (
    attention_of,
    call_argument,
    call_parameters,
    denoiser,
    dtype_of,
    execution_device,
    native_size,
    offload_of,
    quantization_of,
    scheduler_class_name,
    scheduler_of,
)
from optsearch.accelerators.calls import true_cfg_ran
from optsearch.accelerators.distill import ADAPTER as DISTILL_ADAPTER
from optsearch.accelerators.hooks import compiled_how
from optsearch.measure.compiling import AS_BUILT

CONTEXT_KEYS = ("batch_size", "height", "width", "num_inference_steps", "strength", "scheduler",
                "guidance_scale", "guidance_scale_2", "true_cfg_scale", "num_frames", "compile",
                "device", "dtype", "offload", "attention", "quantization", "lora_scales")

OFFLOAD_TEXT = {"model": ", model CPU offload", "sequential": ", sequential CPU offload",
                "group": ", group offload", "device map": ", split by a device map"}


def output_size(images) -> dict:
    """The size a batch of outputs (N, H, W, C) or videos (N, F, H, W, C) came out at, as the
    baseline record keeps it: what "native size" was, for a spec that left it to the pipeline."""
    shape = images.shape
    return {"image_size": [int(shape[-3]), int(shape[-2])],
            "frames": int(shape[1]) if len(shape) == 5 else None}


def measured_context(spec, batch_size: int, compiled: str | None = None,
                     device: str | None = None, dtype: str | None = None,
                     offload: str | None = None, attention: str | None = None,
                     scheduler: str | None = None, size: Mapping | None = None,
                     quantization: str | None = None, true_cfg_scale: float | None = None) -> dict:
    """What the study's trials ran. `size`: the baseline's `output_size`, for what the spec left
    to the pipeline (its native size, a video pipeline's frame count); None where not known
    (a study stored before it was recorded).
    `compiled`: a trial's record of how its denoiser was compiled, which says it even where the
    pipeline came compiled and the spec says "none". `device` and `dtype`: the baseline's (a
    speedup measured on one GPU is not another's). `offload`: the baseline's "model",
    "sequential", "group" or "none" (an offloaded pipeline's calls carry its transfers);
    `attention`: the denoiser's attention backend ("native": torch's SDPA, "flash", "sage");
    `scheduler`: the baseline's scheduler class (else the spec's `model.scheduler`, if set): what
    a skipped or dropped step is worth depends on the solver. `quantization`: the denoiser's
    ("none" where plain; see `quantization_of`). `true_cfg_scale`: the scale the baseline's calls
    ran (`true_cfg_ran`), where the spec sets none (Qwen-Image run at 1.0, one pass)."""
    model = spec.model
    height, width = (size or {}).get("image_size") or (None, None)
    context = {"batch_size": batch_size, "height": model.height or height,
               "width": model.width or width, "num_inference_steps": model.steps,
               "scheduler": scheduler or scheduler_class_name(model.scheduler),
               "guidance_scale": model.guidance_scale,
               "num_frames": model.num_frames or (size or {}).get("frames"),
               "compile": compiled.split(":")[0] if compiled else model.compile,
               "device": device, "dtype": dtype, "offload": offload, "attention": attention,
               "quantization": quantization}
    if model.guidance_scale_2 is not None:  # only then: other studies' contexts stay as they were
        context["guidance_scale_2"] = model.guidance_scale_2
    ran = model.true_cfg_scale if model.true_cfg_scale is not None else true_cfg_scale
    if ran is not None:  # Qwen-Image's true CFG: a second pass of the denoiser (only where it has one)
        context["true_cfg_scale"] = ran
    if model.strength is not None:  # image-to-image: the share of the steps that denoise
        context["strength"] = model.strength
    if model.lora:  # the LoRA served: its scale, and whether its work is fused away
        context["lora"] = lora_text(model)
    if model.lora and not model.fuse_lora:  # kept as adapters: the weights set_adapters gives
        context["lora_scales"] = sorted(scale for _, scale in model.loras)
    if model.call:  # [model.call]: what else every call passed
        context["call"] = dict(model.call)
    if compiled and compiled.endswith(AS_BUILT):  # compiled by whoever built the pipeline
        context["compiled_by"] = "builder"
    return context


def lora_text(model) -> str:
    """'styles/ink.safetensors at 0.8, fused' for a spec's `[model]` LoRA ('a at 0.8 + b at 0.5,
    adapters' for several)."""
    weight = f" ({model.lora_weight_name})" if model.lora_weight_name else ""
    named = " + ".join(f"{source}{weight} at {scale:g}" for source, scale in model.loras)
    kept = "adapters" if len(model.loras) > 1 else "an adapter"
    return f"{named}, {'fused' if model.fuse_lora else kept}"


def context_text(context: Mapping) -> str:
    """'batch 4, 512x512, 50 steps, guidance 7.5' ('native size' where the pipeline chose it;
    '50 steps at strength 0.6' for image-to-image)."""
    size = (f"{context['height']}x{context['width']}" if context.get("height") and context.get("width")
            else "native size")
    frames = f", {context['num_frames']} frames" if context.get("num_frames") else ""
    compiled = (f", denoiser compiled ({context['compile']})"
                if context.get("compile") not in (None, "none") else "")
    offload = OFFLOAD_TEXT.get(context.get("offload"), "")
    attention = (f", attention {context['attention']}"
                 if context.get("attention") not in (None, "native") else "")
    scheduler = f" ({context['scheduler']})" if context.get("scheduler") else ""
    quantized = (f", quantized ({context['quantization']})"
                 if context.get("quantization") not in (None, "none") else "")
    guidance = (f" ({context['guidance_scale_2']} on the second expert)"
                if context.get("guidance_scale_2") is not None else "")
    guidance += (f", true CFG {context['true_cfg_scale']}"  # 1.0: one pass, as most pipelines run
                 if (context.get("true_cfg_scale") or 1.0) > 1.0 else "")
    strength = f" at strength {context['strength']}" if context.get("strength") is not None else ""
    called = "".join(f", {name}={value!r}" for name, value in (context.get("call") or {}).items())
    return (f"batch {context['batch_size']}, {size}{frames}, {context['num_inference_steps']} "
            f"steps{strength}{scheduler}, guidance {context['guidance_scale']}{guidance}{called}"
            f"{compiled}{offload}{attention}{quantized}"
            + (f", LoRA {context['lora']}" if context.get("lora") else ""))


def _served(pipe, args: tuple, kwargs: Mapping, called: tuple[str, ...] = ()) -> dict:
    """The context of one pipeline call, as far as its arguments tell (and the `called`
    arguments [model.call] measured with, as passed or by default)."""
    prompt = call_argument(pipe, "prompt", args, kwargs)
    prompts = 1 if isinstance(prompt, str) or prompt is None else len(prompt)
    per_prompt = kwargs.get("num_images_per_prompt") or kwargs.get("num_videos_per_prompt") or 1
    served = {"batch_size": prompts * per_prompt}
    defaults = call_parameters(pipe)
    for key in ("height", "width", "num_inference_steps", "strength", "guidance_scale",
                "guidance_scale_2", "num_frames", *called):
        served[key] = kwargs[key] if key in kwargs else getattr(defaults.get(key), "default", None)
    served["true_cfg_scale"] = true_cfg_ran(pipe, args, kwargs)  # 1.0 without a negative prompt
    native = native_size(pipe)
    if native is not None:  # what the pipeline makes of a size left out
        served["height"] = served["height"] or native[0]
        served["width"] = served["width"] or native[1]
    from optsearch.measure.devices import device_name  # torch: loaded by now

    model = denoiser(pipe)
    served["compile"] = compiled_how(model)
    served["device"] = device_name(execution_device(pipe))
    served["offload"] = offload_of(pipe) or "none"
    served["attention"] = attention_of(pipe)
    served["quantization"] = quantization_of(pipe) or "none"
    served["scheduler"] = scheduler_of(pipe)
    served["dtype"] = dtype_of(pipe)
    served["lora_scales"] = adapter_scales(pipe)
    return served


def adapter_scales(pipe) -> list[float] | None:
    """The weight `set_adapters` gave each active LoRA adapter of the denoiser, read off the
    first layer it adapts (peft's scaling over alpha / r), sorted; None where none runs (a plain
    or fused pipeline: the weights' signature tells those). A distilled LoRA is the setting's."""
    from peft.tuners.lora import LoraLayer  # torch is loaded: a pipeline is being called

    scales: dict[str, float] = {}
    for module in denoiser(pipe).modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters:
            continue
        for name in module.active_adapters:
            if name in module.scaling and name not in scales and name != DISTILL_ADAPTER:
                rank = math.sqrt(module.r[name]) if module.use_rslora.get(name) else module.r[name]
                scales[name] = round(module.scaling[name] * rank / module.lora_alpha[name], 4)
    return sorted(scales.values()) or None


class ContextCheck:
    """Warns (once per differing item) when a call serves another context than was measured."""

    def __init__(self, measured: Mapping, set_by_setting: tuple[str, ...] = ()):
        """`set_by_setting`: the context the setting sets itself (distill's guidance off)."""
        self.measured = dict(measured)
        self.warned: set[str] = set(set_by_setting)

    def __call__(self, pipe, args: tuple, kwargs: Mapping) -> None:
        called = self.measured.get("call") or {}  # [model.call]'s arguments, compared as the rest
        served = _served(pipe, args, kwargs, tuple(called))
        measured = {**self.measured, **called}
        for key in (*CONTEXT_KEYS, *called):
            then, now = measured.get(key), served.get(key)
            if then is None or now is None or key in self.warned or _same(now, then):
                continue
            self.warned.add(key)
            warnings.warn(f"optsearch: this setting was measured at {key} = {then}; called with "
                          f"{now}, its speedup and quality may differ (search again at {key} = "
                          f"{now} to know)", UserWarning, stacklevel=3)


def _same(now, then) -> bool:
    """Equal, or a number and a list of that number (one conditioning scale for each of several
    ControlNets, measured as a list: a pipeline gives a number to each)."""
    if isinstance(now, list) != isinstance(then, list):
        listed, number = (now, then) if isinstance(now, list) else (then, now)
        return bool(listed) and all(value == number for value in listed)
    return now == then


def check_pipeline(pipe, baseline: Mapping) -> None:
    """Warn when `pipe` is not the pipeline the export's baseline measured: its weights or
    scheduler differ (another LoRA fused, a fine-tune, a revision), so its figures may not hold.
    Compared only at the baseline's dtype (the context check names a dtype change)."""
    if not baseline.get("pipeline"):  # an export of a study stored before signatures
        return
    from optsearch.measure.fingerprint import pipeline_signature

    if dtype_of(pipe) != baseline.get("dtype"):
        return
    if pipeline_signature(pipe) != baseline["pipeline"]:
        warnings.warn("optsearch: this pipeline is not the one the setting was measured on (its "
                      "weights or scheduler differ: another LoRA, fine-tune or revision?): its "
                      "speedup and quality may differ (search it to know)", UserWarning, stacklevel=3)
