"""The spec's pipeline as it will be served: loaded, checked that every combo searched applies to
it (before anything is measured), and compiled as `[model] compile` says."""

from __future__ import annotations

import logging

from optsearch.accelerators import (
    apply_setting,
    call_parameters,
    call_problem,
    combo_name,
    combo_problem,
    denoiser,
    enabled_already,
    pipeline_kind,
    pipeline_problem,
)
from optsearch.errors import ModelLoadError
from optsearch.measure.compiling import adopt_compiled, compile_denoiser, compiled_as
from optsearch.measure.models import load_pipeline, with_lora

logger = logging.getLogger(__name__)


def check_families(pipe, spec) -> None:
    """Every combo the spec searches must apply to the pipeline as loaded (its kind was told from
    the model id before loading; a wrong guess ends here, before anything is measured)."""
    kind = pipeline_kind(pipe)
    enabled = enabled_already(pipe)
    if enabled:
        raise ModelLoadError(f"model {spec.model.id!r}: the pipeline comes with {enabled}; the "
                             "baseline must be the plain pipeline: disable it where the pipeline "
                             "is built")
    for combo in spec.search.combos:
        problem = combo_problem(combo, kind)
        if problem:
            raise ModelLoadError(f"model {spec.model.id!r}: {problem}; set model.kind if it was "
                                 "told wrongly from the id")
        if problem := _problem(combo, pipe, spec):  # as loaded: its kind is right
            raise ModelLoadError(f"model {spec.model.id!r}: {problem}{_instead_of_any(spec, combo, pipe)}")
    if spec.model.guidance_scale_2 is not None and getattr(pipe, "transformer_2", None) is None:
        raise ModelLoadError(f"model {spec.model.id!r}: model.guidance_scale_2 applies to a second "
                             "expert (Wan 2.2 A14B's transformer_2); this pipeline runs one: leave it out")
    if problem := _strength_problem(pipe, spec.model.strength):
        raise ModelLoadError(f"model {spec.model.id!r}: {problem}")
    taken = call_parameters(pipe)
    for name in spec.model.call:
        if name not in taken:
            raise ModelLoadError(f"model.call.{name}: {type(pipe).__name__}'s call takes no {name} "
                                 f"(it takes: {', '.join(n for n in taken if n != 'self')})")
    for distilled in spec.distill_settings():  # each loaded and unloaded once: one that cannot
        apply_setting(pipe, distilled).restore()  # load ends here, before the baseline is timed


def _strength_problem(pipe, strength: float | None) -> str | None:
    """An image-to-image call denoises int(steps * strength) of its steps: what the search counts
    step-counted parameters, masks and MagCache's steps in must be the strength served."""
    parameter = call_parameters(pipe).get("strength")
    name = type(pipe).__name__
    if strength is not None and parameter is None:
        return (f"model.strength applies to image-to-image pipelines; {name} takes none (it "
                "denoises every step): leave it out")
    default = None if parameter is None else parameter.default
    if strength is None and isinstance(default, float) and default < 1:
        return (f"{name} denoises a share of its steps (strength {default} by default): set "
                "model.strength to the strength you serve")
    return None


def _instead_of_any(spec, refused: tuple[str, ...], pipe) -> str:
    """For `accelerators = "any"` (the kind's combos, fixed before loading): the list to write
    instead, every combo of it that this pipeline takes (Wan 2.2 A14B refuses two of them)."""
    if spec.search.accelerators != "any":
        return ""
    applies = [list(combo) for combo in spec.search.combos  # whatever values it will search
               if _problem(combo, pipe, spec, searched=False) is None]
    listed = ", ".join("[" + ", ".join(f'"{name}"' for name in combo) + "]" for combo in applies)
    return f'; "any" includes {combo_name(refused)}: write search.accelerators = [{listed}]'


def _problem(combo, pipe, spec, searched: bool = True) -> str | None:
    """Why a family of `combo` cannot run on this pipeline, as the spec calls it, or None;
    `searched`: with the values the spec searches (else whatever values it would)."""
    from optsearch.measure.generation import GenerationConfig

    values = _searched(spec, combo) if searched else None
    return _hooks_problem(combo, pipe) or pipeline_problem(combo, pipe, values) \
        or call_problem(combo, pipe, GenerationConfig.from_spec(spec).guidance_kwargs(1, pipe))


def _hooks_problem(combo, pipe) -> str | None:
    """diffusers' caches enable through a transformer's `enable_cache`: one without it (SD3's,
    Z-Image's) takes fewer steps, a distilled LoRA and cache-dit's DBCache only."""
    if pipeline_kind(pipe) == "transformer" and set(combo) - {"steps", "dbcache", "distill"} \
            and not hasattr(denoiser(pipe), "enable_cache"):
        return (f"{combo_name(combo)} needs diffusers' enable_cache, which "
                f"{type(denoiser(pipe)).__name__} lacks (steps, distill and dbcache apply)")
    return None


def _searched(spec, combo) -> dict[str, dict]:
    """The values each family of `combo` may take in this study (what `problem_with` checks)."""
    return {name: spec.searched_values(name) for name in combo}


def pipeline_from_spec(spec, device: str | None = None):
    """Load the spec's pipeline (on `device` when given), check its combos apply to it, and
    compile it as the spec serves it."""
    model = spec.model
    pipe = load_pipeline(model.id, device or model.device, model.dtype, model.scheduler,
                         kind=None if model.kind == "auto" else model.kind,
                         factory_path=model.factory_path, image_to_image=model.strength is not None,
                         controlnet=model.controlnet)
    if model.lora:
        with_lora(pipe, model.loras, model.lora_weight_name, model.fuse_lora)
    check_families(pipe, spec)
    return compiled_for(spec, pipe)


def compiled_for(spec, pipe):
    """The pipeline compiled as `[model] compile` says, once. One whose denoiser came compiled is
    measured as it came (said when the spec says otherwise): compiling it again would time
    another pipeline than the one served."""
    if compiled_as(pipe) is not None:
        return pipe
    came = adopt_compiled(pipe)
    if came is not None and came != spec.model.compile:
        logger.warning("the pipeline's denoiser came compiled (%s) where model.compile = %r: "
                       "measured compiled, as it came (a full untimed call before each timing)",
                       came, spec.model.compile)
    elif came is None and spec.model.compile != "none":
        compile_denoiser(pipe, spec.model.compile, spec.model.compile_mode, spec.model.compile_backend)
    return pipe
