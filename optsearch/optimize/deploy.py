"""The winner as files that deploy without optsearch: a cache-dit YAML, or a short Python function.

`study export --format cache-dit -o cache.yaml` writes what
`cache_dit.enable_cache(pipe, **cache_dit.load_configs("cache.yaml"))` loads (a dbcache winner).
`--format diffusers -o accelerate_pipe.py` writes `accelerate(pipe)`, which applies the winner with
the accelerator libraries' own calls (DeepCache, tomesd, T-GATE's loader, `transformer.enable_cache`,
cache-dit) and returns the keyword arguments each pipeline call takes (`num_inference_steps`, and
T-GATE's `gate_step`). Both start from the export dict (`export_study`): the same winner as JSON.
"""

from __future__ import annotations

import json

from optsearch.accelerators import scheduler_class_name
from optsearch.deployment import context_text
from optsearch.errors import UsageError
from optsearch.formatting import format_interval, format_setting, format_speedup
from optsearch.optimize.family_code import (
    CONTEXT_KEYED,
    cache_context_code,
    dbcache_options,
    denoising_of,
    distill_code,
    family_code,
    measured_run,
    steps_of,
)
from optsearch.storage.record import quality_of

FORMATS = ("json", "cache-dit", "diffusers")


def _claim(exported: dict) -> str:
    """One line: what was measured for the winner, with its intervals."""
    best, metric = exported["best"], exported["metric"]
    figures = best["confirmed"] or best["metrics"]
    where = "confirmed on unseen prompts" if best["confirmed"] else "search figures"
    return (f"study {exported['study']}, trial {best['trial']}: speedup {format_speedup(figures)}, "
            f"{metric} {format_interval(quality_of(figures, metric))} ({where})")


def _measured_with(exported: dict) -> str:
    """The libraries the figures were measured with, for the export's header: a config an older
    release lacks (SeaCache came in diffusers 0.42) or decides otherwise changes the claim."""
    provenance = exported.get("provenance") or {}
    libraries = [f"{name} {provenance[name]}" for name in ("torch", "diffusers") if provenance.get(name)]
    return f"measured with {', '.join(libraries)}" if libraries else ""


def _measured_at(exported: dict) -> str:
    """What the figures hold for (batch, size, steps, scheduler, LoRA, ...), for the headers; ""
    for an export without a recorded context (a study stored before it was recorded)."""
    context = exported.get("deployment") or {}
    return context_text(context) if context.get("batch_size") is not None else ""


def _strength(exported: dict) -> float | None:
    return exported["spec"]["model"].get("strength")


def _call_arguments(exported: dict) -> dict:
    """[model.call]: the other arguments every measured call passed."""
    return exported["spec"]["model"].get("call") or {}


def _scheduler_code(exported: dict) -> list[str]:
    """The scheduler the study set (`model.scheduler`): the figures hold with that solver."""
    name = scheduler_class_name(exported["spec"]["model"].get("scheduler"))
    if name is None:
        return []
    return ["", f"# measured with the {name} (model.scheduler), from the model's scheduler config",
            "import diffusers", "",
            f"pipe.scheduler = diffusers.{name}.from_config(pipe.scheduler.config)"]


def _compile_code(exported: dict) -> list[str]:
    """The denoiser compiled as the setting was measured (before it was applied), if it was."""
    model = exported["spec"]["model"]
    deployment = exported.get("deployment") or {}
    how = deployment.get("compile") or model.get("compile", "none")
    if how == "none":
        return []
    if deployment.get("compiled_by") == "builder":  # the pipeline came compiled: its builder's way
        return ["", f"# measured with the denoiser compiled ({how}) as the pipeline was built, "
                    "before the setting was applied: serve it compiled the same way"]
    options = f"backend={model.get('compile_backend', 'inductor')!r}" + (
        f", mode={model['compile_mode']!r}" if model.get("compile_mode") else "")
    call = ("compile_repeated_blocks(fullgraph=False, " if how == "regional" else "compile(") \
        + options + ")"
    controlnet = ["    for block in pipe.controlnet.modules():  # the blocks it copied from the denoiser",
                  "        if type(block).__name__ in denoiser._repeated_blocks:",
                  f"            block.compile(fullgraph=False, {options})"] \
        if how == "regional" else [f"    pipe.controlnet.compile({options})"]
    return ["", f"# measured with the denoiser compiled ({how}) before the setting was applied",
            "denoiser = pipe.unet if getattr(pipe, 'unet', None) is not None else pipe.transformer",
            f"denoiser.{call}",
            "if getattr(pipe, 'transformer_2', None) is not None:  # Wan 2.2 A14B: both experts",
            f"    pipe.transformer_2.{call}",
            "if getattr(pipe, 'controlnet', None) is not None:  # a ControlNet, compiled as measured",
            *controlnet]


def cache_dit_yaml(exported: dict) -> str:
    """cache-dit's own config file for a dbcache winner (steps stay a call argument)."""
    setting = exported["best"]["setting"]
    if "dbcache" not in setting:
        raise UsageError(f"--format cache-dit needs a dbcache winner; study {exported['study']!r} "
                         f"won with {format_setting(setting)} (use --format diffusers or json)")
    params = dbcache_options(setting["dbcache"], denoising_of(exported, "dbcache"), exported)
    order = params.pop("taylorseer_order", 0)
    context = _measured_at(exported)
    lines = [f"# {_claim(exported)}",
             *[f"# {line}" for line in [_measured_with(exported)] if line],
             *([f"# measured at {context}: serve at it"] if context else []),
             f"# call the pipeline with num_inference_steps={steps_of(exported)}"
             + (f", strength={_strength(exported)}" if _strength(exported) is not None else "")
             + "".join(f", {name}={value!r}" for name, value in _call_arguments(exported).items()),
             *[f"# {line.removeprefix('# ')}" for line in _scheduler_code(exported)[1:2]],
             *([f"# {line.removeprefix('# ')}" for line in ["first the step-distilled LoRA, as measured:",
                *distill_code(setting["distill"], measured_run(exported, "distill"))]]
               if "distill" in setting else []),
             "# load: cache_dit.enable_cache(pipe, **cache_dit.load_configs(\"this.yaml\"))",
             *[f"# {line.removeprefix('# ')}" for line in _compile_code(exported)[1:]],
             "cache_config:"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in params.items()]
    if order:
        lines += ["  enable_taylorseer: true", "  enable_encoder_taylorseer: true",  # as measured
                  f"  taylorseer_order: {order}"]
    return "\n".join(lines) + "\n"


def diffusers_python(exported: dict) -> str:
    """A Python module with `accelerate(pipe) -> call kwargs`: the winner, without optsearch."""
    setting = exported["best"]["setting"]
    strength = _strength(exported)
    steps = "'num_inference_steps': NUM_INFERENCE_STEPS" + (", 'strength': STRENGTH" if strength else "")
    called = _call_arguments(exported)
    body = [f"call_kwargs = {{{steps}}}"]
    if called:
        body.append(f"call_kwargs.update({called!r})  # [model.call], as measured")
    body += [*_scheduler_code(exported), *_compile_code(exported)]
    for name, params in setting.items():
        code = family_code(name, params, exported)
        if code:
            body += ["", f"# {name}", *code]
    if any(name in CONTEXT_KEYED for name in setting):
        body += cache_context_code()
    body += ["return call_kwargs"]
    indented = "\n".join(f"    {line}" if line else "" for line in body)
    measured = _measured_with(exported)
    measured = f"{measured[:1].upper()}{measured[1:]}.\n" if measured else ""
    if context := _measured_at(exported):
        measured += f"Measured at {context}: serve at it.\n"
    return (f'"""Apply {format_setting(setting)} to a diffusers pipeline.\n\n'
            f"{_claim(exported)}.\n{measured}Generated by optsearch; needs only the libraries it imports.\n"
            f'"""\n\nNUM_INFERENCE_STEPS = {steps_of(exported)}\n'
            + (f"STRENGTH = {strength}  # image-to-image: the share of the steps that denoise\n"
               if strength else "") + "\n\n"
            "def accelerate(pipe) -> dict:\n"
            '    """Apply the setting to `pipe` in place; returns the keyword arguments every call\n'
            '    takes: pipe(prompt, **accelerate(pipe))."""\n'
            f"{indented}\n")
