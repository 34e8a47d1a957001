"""The winner as files that deploy without optsearch: a cache-dit YAML, or a short Python function.

`study export --format cache-dit -o cache.yaml` writes what
`cache_dit.enable_cache(pipe, **cache_dit.load_configs("cache.yaml"))` loads (a dbcache winner).
`--format diffusers -o accelerate_pipe.py` writes `accelerate(pipe)`, which applies the winner with
the accelerator libraries' own calls (DeepCache, tomesd, T-GATE's loader, `transformer.enable_cache`,
cache-dit) and returns the keyword arguments each pipeline call takes (`num_inference_steps`, and
T-GATE's `gate_step`). Both start from the export dict (`export_study`): the same winner as JSON.
"""

from __future__ import annotations

import inspect
import json

from optsearch.accelerators import dbcache, magcache, scheduler_class_name
from optsearch.accelerators.fastercache import BATCHED_GUIDANCE, FRAMES_FIRST
from optsearch.deployment import context_text
from optsearch.errors import UsageError
from optsearch.formatting import format_interval, format_setting, format_speedup
from optsearch.storage.record import quality_of

FORMATS = ("json", "cache-dit", "diffusers")
DBCACHE_DEFAULTS = {name: parameter.default for name, parameter in  # optsearch's, not cache-dit's
                    inspect.signature(dbcache.apply).parameters.items()
                    if parameter.default is not inspect.Parameter.empty}


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


def _steps(exported: dict) -> int:
    setting = exported["best"]["setting"]
    return setting.get("steps", {}).get("num_inference_steps", exported["spec"]["model"]["steps"])


def _denoising(exported: dict, family: str) -> int:
    """The steps a family's config counts: the call's, or where an image-to-image call denoised a
    share of them, those the trial ran (recorded by the pipeline's own rounding)."""
    return int(_ran_with(exported, family).get("denoising_steps", _steps(exported)))


def _ran_with(exported: dict, family: str) -> dict:
    """What a family's measured calls ran with beyond its setting (recorded by the trial)."""
    return (exported.get("calibration") or {}).get(family, {})


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
    params = _dbcache_options(setting["dbcache"], _denoising(exported, "dbcache"), exported)
    order = params.pop("taylorseer_order", 0)
    context = _measured_at(exported)
    lines = [f"# {_claim(exported)}",
             *[f"# {line}" for line in [_measured_with(exported)] if line],
             *([f"# measured at {context}: serve at it"] if context else []),
             f"# call the pipeline with num_inference_steps={_steps(exported)}"
             + (f", strength={_strength(exported)}" if _strength(exported) is not None else "")
             + "".join(f", {name}={value!r}" for name, value in _call_arguments(exported).items()),
             *[f"# {line.removeprefix('# ')}" for line in _scheduler_code(exported)[1:2]],
             *([f"# {line.removeprefix('# ')}" for line in ["first the step-distilled LoRA, as measured:",
                *_distill_code(setting["distill"], _ran_with(exported, "distill"))]]
               if "distill" in setting else []),
             "# load: cache_dit.enable_cache(pipe, **cache_dit.load_configs(\"this.yaml\"))",
             *[f"# {line.removeprefix('# ')}" for line in _compile_code(exported)[1:]],
             "cache_config:"]
    lines += [f"  {key}: {json.dumps(value)}" for key, value in params.items()]
    if order:
        lines += ["  enable_taylorseer: true", "  enable_encoder_taylorseer: true",  # as measured
                  f"  taylorseer_order: {order}"]
    return "\n".join(lines) + "\n"


def _dbcache_options(params: dict, steps: int, exported: dict) -> dict:
    """A dbcache setting as cache-dit's config takes it: a steps mask by its policy's name, with
    the step count it is built for (cache-dit's loader builds it from both); none without one.
    Where the measured calls ran no separate guidance on a pipeline cache-dit takes to (Qwen-Image
    without true CFG), `enable_separate_cfg: false`, as measured (the trial recorded it)."""
    options = {**DBCACHE_DEFAULTS, **params}  # what optsearch ran where the setting is silent
    ran_with = _ran_with(exported, "dbcache")
    if "enable_separate_cfg" in ran_with:
        options["enable_separate_cfg"] = ran_with["enable_separate_cfg"]
    mask = options.pop("steps_computation_mask", "none")
    policy = options.pop("steps_computation_policy", "dynamic")
    if mask != "none":
        options.update(num_inference_steps=steps, steps_computation_mask=mask,
                       steps_computation_policy=policy)
    return options


def _each_expert(config: str) -> list[str]:
    """Enable a diffusers cache on the transformer and, on Wan 2.2 A14B, its second expert."""
    return ["for expert in (pipe.transformer, getattr(pipe, 'transformer_2', None)):",
            "    if expert is not None:  # Wan 2.2 A14B runs a second expert for low-noise steps",
            f"        expert.enable_cache({config})"]


def _magcache_per_expert(options: dict, calibration: dict, steps: int) -> list[str]:
    """MagCache on Wan 2.2 A14B: each expert its own ratios, over the steps it runs (as measured:
    its config's retention and interpolation count that expert's steps)."""
    text = ", ".join(f"{key}={value!r}" for key, value in options.items())
    (ratios, first), (ratios_2, second) = magcache.expert_shares(calibration, steps)
    return ["from diffusers import MagCacheConfig", "", f"options = dict({text})",
            f"# Wan 2.2 A14B: of {steps} steps the first expert runs {first} (at or above the "
            "boundary timestep), the second the rest;",
            "# served at another step count, each expert's num_inference_steps is its share of it",
            "pipe.transformer.enable_cache(MagCacheConfig(",
            f"    **options, num_inference_steps={max(1, first)}, mag_ratios={ratios!r}))",
            "pipe.transformer_2.enable_cache(MagCacheConfig(",
            f"    **options, num_inference_steps={max(1, second)}, mag_ratios={ratios_2!r}))"]


def _family_code(name: str, params: dict, exported: dict) -> list[str]:
    """The lines of `accelerate(pipe)` that apply one family with its library's own calls."""
    args = ", ".join(f"{key}={value!r}" for key, value in params.items())
    if name == "steps":
        return []
    if name == "distill":
        return _distill_code(params, _ran_with(exported, "distill"))
    if name == "deepcache":
        return ["from DeepCache import DeepCacheSDHelper", "",
                "helper = DeepCacheSDHelper(pipe=pipe)",
                f"helper.set_params({args})", "helper.enable()",
                "pipe.deepcache = helper  # helper.disable() undoes it (T-GATE drives it too)"]
    if name == "tome":
        return ["import tomesd", "", f"tomesd.apply_patch(pipe, {args})"]
    if name == "tgate":
        return ["from types import MethodType", "",
                "sdxl, cached = hasattr(pipe, 'text_encoder_2'), hasattr(pipe, 'deepcache')",
                "if sdxl and cached:", "    from tgate.SDXL_DeepCache import tgate",
                "elif cached:", "    from tgate.SD_DeepCache import tgate",
                "elif sdxl:", "    from tgate.SDXL import tgate",
                "else:", "    from tgate.SD import tgate",
                "pipe.tgate = MethodType(tgate, pipe)  # generate with pipe.tgate(..., **kwargs)",
                f"call_kwargs['gate_step'] = {params['gate_step']!r}"]
    if name in ("fbcache", "taylorseer", "pab", "magcache", "seacache"):
        config = {"fbcache": "FirstBlockCacheConfig", "taylorseer": "TaylorSeerCacheConfig",
                  "pab": "PyramidAttentionBroadcastConfig", "magcache": "MagCacheConfig",
                  "seacache": "SeaCacheConfig"}[name]
        options = dict(params)
        if name == "pab":
            low, high = options.pop("timestep_skip_low"), options.pop("timestep_skip_high")
            options["spatial_attention_timestep_skip_range"] = (low, high)
        if name == "magcache":
            calibration = (exported.get("calibration") or {}).get("magcache", {})
            if calibration.get("mag_ratios_2"):
                return _magcache_per_expert(options, calibration, _steps(exported))
            options.update(num_inference_steps=_denoising(exported, "magcache"),
                           mag_ratios=calibration.get("mag_ratios"))
        text = ", ".join(f"{key}={value!r}" for key, value in options.items())
        lines = ["import torch"] * (name == "taylorseer") + [f"from diffusers import {config}", "",
                                                             f"options = dict({text})"]
        if name == "pab":
            return lines + _pab_code()
        if name == "taylorseer":
            lines += ["if pipe._execution_device.type == 'cpu':  # bfloat16 factors are slow there",
                      "    options['taylor_factors_dtype'] = torch.float32"]
        return lines + [*_each_expert(f"{config}(**options)")]
    if name == "fastercache":  # as accelerators/fastercache.py applies it
        return ["from diffusers import FasterCacheConfig", "",
                "name = type(pipe).__name__",
                f"batched = name.startswith({BATCHED_GUIDANCE!r})  # one call holds both CFG halves",
                "options = dict(",
                f"    spatial_attention_block_skip_range={params['spatial_attention_block_skip_range']!r},",
                f"    spatial_attention_timestep_skip_range=(-1, {params['timestep_skip_high']!r}),",
                f"    unconditional_batch_skip_range={params['unconditional_batch_skip_range']!r},",
                "    current_timestep_callback=lambda: pipe.current_timestep,",
                "    attention_weight_callback=lambda _module: 0.5,",
                f"    tensor_format='BFCHW' if name.startswith({FRAMES_FIRST!r}) else 'BCFHW',",
                "    is_guidance_distilled=not batched)",
                "pipe.transformer.enable_cache(FasterCacheConfig(**options))",
                "if getattr(pipe, 'transformer_2', None) is not None:  # Wan 2.2 A14B's low-noise expert",
                "    import math",
                "",
                "    import torch",
                "",
                "    def second_expert_timestep():",
                "        # its first step reads as outside the window, so it computes and caches",
                "        # there (diffusers' hooks would reuse an empty cache); tensors: compile-safe",
                "        timestep, timesteps = pipe.current_timestep, pipe.scheduler.timesteps",
                "        boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps",
                "        first = torch.where(timesteps < boundary, timesteps, -math.inf).max()",
                "        return torch.where(timestep == first, math.inf, timestep)",
                "",
                "    options['current_timestep_callback'] = second_expert_timestep",
                "    pipe.transformer_2.enable_cache(FasterCacheConfig(**options))"]
    if name == "dbcache":
        options = _dbcache_options(params, _denoising(exported, "dbcache"), exported)
        order = options.pop("taylorseer_order", 0)
        text = ", ".join(f"{key}={value!r}" if key != "steps_computation_mask" else
                         f"{key}=cache_dit.steps_mask(total_steps={options['num_inference_steps']}, "
                         f"mask_policy={value!r})" for key, value in options.items())
        calibrator = f"TaylorSeerCalibratorConfig(taylorseer_order={order})" if order else "None"
        names = "DBCacheConfig, TaylorSeerCalibratorConfig" if order else "DBCacheConfig"
        return ["import cache_dit", f"from cache_dit import {names}",
                "", f"cache_dit.enable_cache(pipe, cache_config=DBCacheConfig({text}),",
                f"                       calibrator_config={calibrator})"]
    raise UsageError(f"--format diffusers does not know family {name!r}")


def _distill_code(params: dict, ran_with: dict) -> list[str]:
    """The step-distilled LoRA as measured (an adapter, or fused), its recipe's scheduler and the
    guidance the calls ran with."""
    lines = []
    for key, into in (("", ""), ("_2", ", load_into_transformer_2=True")):  # Wan 2.2: each expert
        source, weight = params.get(f"lora{key}"), params.get(f"weight_name{key}") or None
        if not source:
            continue
        if source.endswith(".safetensors"):  # a file: its folder and its name
            source, _, weight = source.rpartition("/")
        named = f", weight_name={weight!r}" if weight else ""
        lines.append(f"pipe.load_lora_weights({source or '.'!r}{named}, adapter_name='distill'{into})")
    lines.append(f"pipe.set_adapters(['distill'], adapter_weights=[{params['lora_scale']!r}])")
    lines += ["pipe.fuse_lora(adapter_names=['distill'], lora_scale=1.0)  # fused, as measured",
              "pipe.unload_lora_weights()"] if params.get("fuse") else \
        ["# measured as an adapter; fused (pipe.fuse_lora(); pipe.unload_lora_weights()) it adds",
         "# no work per step and runs a little faster than measured"]
    if ran_with.get("call"):
        lines.append(f"call_kwargs.update({ran_with['call']!r})  # guidance off, as measured "
                     "(and no negative prompt)")
    if ran_with.get("scheduler"):  # the scheduler settings of the LoRA's recipe
        overrides = dict(ran_with["scheduler"])
        name = overrides.pop("_class_name", None)
        lines += [*([f"from diffusers import {name}"] if name else []),
                  f"recipe = {overrides!r}",
                  f"pipe.scheduler = {name or 'type(pipe.scheduler)'}.from_config("
                  "{**pipe.scheduler.config, **recipe})"]
    return lines


def _pab_code() -> list[str]:
    """PAB as accelerators/pab.py applies it: on a transformer's `enable_cache`, else (an SD UNet)
    diffusers' hook on its attention layers; the timestep from the pipeline where it tracks one,
    else read from each denoiser call, on the 0-1000 scale (FLUX Fill's and image-to-image's
    loops pass it divided by 1000)."""
    return [
        "from diffusers.hooks import apply_pyramid_attention_broadcast", "",
        "denoiser = getattr(pipe, 'transformer', None) or pipe.unet",
        "if hasattr(type(pipe), 'current_timestep'):",
        "    options['current_timestep_callback'] = lambda: pipe.current_timestep",
        "else:  # the loop tracks no timestep (SD, FLUX Fill, image-to-image): read each call's",
        "    seen = {'timestep': 1000.0, 'scale': None}",
        "",
        "    def read_timestep(module, args, kwargs):",
        "        timestep = kwargs.get('timestep', args[1] if len(args) > 1 else None)",
        "        if timestep is None:",
        "            return",
        "        value = float(timestep.flatten()[0]) if hasattr(timestep, 'flatten') else float(timestep)",
        "        if seen['scale'] is None:  # 1000 where the loop passes timestep / 1000",
        "            timesteps = [float(t) for t in pipe.scheduler.timesteps]",
        "            scaled = min(abs(t - 1000 * value) for t in timesteps) <= 10 * value",
        "            own = min(abs(t - value) for t in timesteps) <= 0.01 * max(value, 1.0)",
        "            seen['scale'] = 1000.0 if value > 0 and scaled and not own else 1.0",
        "        seen['timestep'] = value * seen['scale']",
        "",
        "    denoiser.register_forward_pre_hook(read_timestep, with_kwargs=True)",
        "    options['current_timestep_callback'] = lambda: seen['timestep']",
        "for expert in (denoiser, getattr(pipe, 'transformer_2', None)):",
        "    if expert is None:",
        "        continue",
        "    if hasattr(expert, 'enable_cache'):",
        "        expert.enable_cache(PyramidAttentionBroadcastConfig(**options))",
        "    else:  # an SD UNet: diffusers' hook on its self-attention layers directly",
        "        apply_pyramid_attention_broadcast(expert, PyramidAttentionBroadcastConfig(**options))"]


# diffusers' caches whose state is keyed by the loop's cache context (PAB's and FasterCache's is not)
CONTEXT_KEYED = ("fbcache", "taylorseer", "magcache", "seacache")


def _cache_context_code() -> list[str]:
    """diffusers' hooks key their state by the cache context the loop names; where it names none
    (FLUX Kontext, Fill, image-to-image in diffusers 0.42) each call is named "cond", as
    optsearch measured it (`HookPatch._name_calls`)."""
    return ["", "# diffusers' caches key their state by the cache context the pipeline's loop names;",
            "# FLUX Kontext's, Fill's and image-to-image's loops name none: each call is \"cond\"",
            "import inspect", "",
            "sources = []",
            "for cls in type(pipe).__mro__:",
            "    try:",
            "        sources.append(inspect.getsource(vars(cls)['__call__']))",
            "    except (KeyError, OSError, TypeError):  # no call of its own, or no source file",
            "        pass",
            "if sources and not any('cache_context' in source for source in sources):",
            "    def enter(module, args):",
            "        module._cache_context = module.cache_context('cond')",
            "        module._cache_context.__enter__()",
            "",
            "    def leave(module, args, output):",
            "        module.__dict__.pop('_cache_context').__exit__(None, None, None)",
            "",
            "    for expert in (pipe.transformer, getattr(pipe, 'transformer_2', None)):",
            "        if expert is not None:",
            "            expert.register_forward_pre_hook(enter)",
            "            expert.register_forward_hook(leave)"]


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
        code = _family_code(name, params, exported)
        if code:
            body += ["", f"# {name}", *code]
    if any(name in CONTEXT_KEYED for name in setting):
        body += _cache_context_code()
    body += ["return call_kwargs"]
    indented = "\n".join(f"    {line}" if line else "" for line in body)
    measured = _measured_with(exported)
    measured = f"{measured[:1].upper()}{measured[1:]}.\n" if measured else ""
    if context := _measured_at(exported):
        measured += f"Measured at {context}: serve at it.\n"
    return (f'"""Apply {format_setting(setting)} to a diffusers pipeline.\n\n'
            f"{_claim(exported)}.\n{measured}Generated by optsearch; needs only the libraries it imports.\n"
            f'"""\n\nNUM_INFERENCE_STEPS = {_steps(exported)}\n'
            + (f"STRENGTH = {strength}  # image-to-image: the share of the steps that denoise\n"
               if strength else "") + "\n\n"
            "def accelerate(pipe) -> dict:\n"
            '    """Apply the setting to `pipe` in place; returns the keyword arguments every call\n'
            '    takes: pipe(prompt, **accelerate(pipe))."""\n'
            f"{indented}\n")
