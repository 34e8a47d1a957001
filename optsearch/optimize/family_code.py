"""Each family's lines in the `--format diffusers` export: the winner applied with its
library's own calls (DeepCache, tomesd, T-GATE's loader, `enable_cache` configs, cache-dit, a
step-distilled LoRA), as optsearch measured it (what the trial recorded it ran with)."""

from __future__ import annotations

import inspect

from optsearch.accelerators import dbcache, magcache
from optsearch.accelerators.fastercache import BATCHED_GUIDANCE, FRAMES_FIRST
from optsearch.errors import UsageError

DBCACHE_DEFAULTS = {name: parameter.default for name, parameter in  # optsearch's, not cache-dit's
                    inspect.signature(dbcache.apply).parameters.items()
                    if parameter.default is not inspect.Parameter.empty}


def steps_of(exported: dict) -> int:
    """The step count the winner's calls take: its own `steps`, else the model's."""
    setting = exported["best"]["setting"]
    return setting.get("steps", {}).get("num_inference_steps", exported["spec"]["model"]["steps"])


def denoising_of(exported: dict, family: str) -> int:
    """The steps a family's config counts: the call's, or where an image-to-image call denoised a
    share of them, those the trial ran (recorded by the pipeline's own rounding)."""
    return int(measured_run(exported, family).get("denoising_steps", steps_of(exported)))


def measured_run(exported: dict, family: str) -> dict:
    """What a family's measured calls ran with beyond its setting (recorded by the trial)."""
    return (exported.get("calibration") or {}).get(family, {})


def dbcache_options(params: dict, steps: int, exported: dict) -> dict:
    """A dbcache setting as cache-dit's config takes it: a steps mask by its policy's name, with
    the step count it is built for (cache-dit's loader builds it from both); none without one.
    Where the measured calls ran no separate guidance on a pipeline cache-dit takes to (Qwen-Image
    without true CFG), `enable_separate_cfg: false`, as measured (the trial recorded it)."""
    options = {**DBCACHE_DEFAULTS, **params}  # what optsearch ran where the setting is silent
    ran_with = measured_run(exported, "dbcache")
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


def family_code(name: str, params: dict, exported: dict) -> list[str]:
    """The lines of `accelerate(pipe)` that apply one family with its library's own calls."""
    args = ", ".join(f"{key}={value!r}" for key, value in params.items())
    if name == "steps":
        return []
    if name == "distill":
        return distill_code(params, measured_run(exported, "distill"))
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
                return _magcache_per_expert(options, calibration, steps_of(exported))
            options.update(num_inference_steps=denoising_of(exported, "magcache"),
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
        options = dbcache_options(params, denoising_of(exported, "dbcache"), exported)
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


def distill_code(params: dict, ran_with: dict) -> list[str]:
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
                  "pipe.scheduler.config, **recipe)  # as keywords: each one holds"]
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


def cache_context_code() -> list[str]:
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
