"""diffusers' cache hooks (FirstBlockCache, TaylorSeer, PAB, MagCache) applied and removed exactly.

diffusers attaches a `HookRegistry` (`_diffusers_hook`) to every module it visits and, on
`disable_cache()` / `remove_hook`, sets the original bound `forward` back as an instance attribute.
`HookPatch.restore` removes the hooks the diffusers way and then deletes what it left, so the
modules look exactly as before. Hook state (cached residuals, step counters) is reset before every
call (`prepare`): a warm-up cut short must not leak into the timed call that follows.

What ran is counted by wrapping the hooks' functions, on an eager denoiser only: inside compiled
blocks dynamo traces the wrappers too, which made more graphs and graph breaks than the cache
alone and slowed FirstBlockCache's compiled trials by 15-35 % (tiny-flux). A family that decides
in eager code (diffusers' `torch.compiler.disable`d functions) counts there instead, compiled or not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads in seconds: spec checks and light commands do without it
    import torch

from optsearch.accelerators.calls import (  # noqa: F401 - re-exported: hooks' users read them here
    call_argument,
    call_parameters,
    call_steps,
    denoised_steps,
    enter_cond_context,
    leave_cache_context,
    runs_separate_cfg,
    sets_cache_context,
)

_LEFT_BY_HOOKS = ("forward", "_diffusers_hook")


def pipeline_kind(pipe) -> str:
    """'unet', 'transformer' or 'video' (a transformer pipeline whose call takes `num_frames`):
    which families the pipeline's denoiser can take, and whether it returns frames."""
    if getattr(pipe, "unet", None) is not None:
        return "unet"
    return "video" if "num_frames" in call_parameters(pipe) else "transformer"


def not_a_pipeline(pipe) -> str | None:
    """Why `pipe` is not a diffusers pipeline optsearch can accelerate, or None: what users hand
    in by mistake is named (a model id, the denoiser itself)."""
    if callable(pipe) and (getattr(pipe, "unet", None) is not None
                           or getattr(pipe, "transformer", None) is not None):
        return None
    if isinstance(pipe, str):
        hint = (": a model id or path; load the pipeline first (DiffusionPipeline.from_pretrained), "
                "or give it to a spec as model.id")
    elif hasattr(pipe, "forward"):
        hint = ": a network, not the pipeline that runs it; pass the pipeline (pipe, not pipe.unet)"
    else:
        hint = ""
    return f"{type(pipe).__name__}, not a diffusers pipeline with a unet or transformer{hint}"


def denoiser(pipe) -> torch.nn.Module:
    """The network every step runs: the UNet or the diffusion transformer."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def offload_of(pipe) -> str | None:
    """How the pipeline moves its weights between host and accelerator, as its builder set it:
    "model" (`enable_model_cpu_offload`), "sequential" (`enable_sequential_cpu_offload`),
    "group" (`enable_group_offload`), "device map" (loaded with `device_map=`: split over
    devices); None when it stays where it is. An offloaded pipeline is measured as built: on a GPU
    that cannot hold it whole, the transfers are part of every call the server makes too."""
    import torch
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    if getattr(pipe, "hf_device_map", None):
        return "device map"
    for module in getattr(pipe, "components", {}).values():
        if not isinstance(module, torch.nn.Module):
            continue
        if getattr(module, "hf_device_map", None):
            return "device map"
        hook = getattr(module, "_hf_hook", None)
        if hook is not None:
            return "model" if type(hook).__name__ == "CpuOffload" else "sequential"
        if _is_group_offload_enabled(module):
            return "group"
    return None


def attention_of(pipe) -> str | None:
    """The attention backend the denoiser dispatches to: "native" (torch's SDPA, the default),
    or what the builder set with diffusers' `set_attention_backend` ("flash", "sage",
    "_flash_3", ...), which changes attention's share of a step and so what a cache saves. None
    for a denoiser whose processors do not dispatch (UNets, SD3's): not named here."""
    for module in denoiser(pipe).modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(processor, "_attention_backend"):
            continue
        backend = processor._attention_backend
        if backend is None:  # unset: the process's active one ($DIFFUSERS_ATTN_BACKEND, "native")
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            backend = _AttentionBackendRegistry.get_active_backend()[0]
        return str(getattr(backend, "value", backend))
    return None


def quantization_of(pipe) -> str | None:
    """How the denoiser's weights are quantized, as its builder did it: diffusers'
    `quantization_config` at load ("bitsandbytes 4bit", "torchao int8wo", "gguf"), a weight
    tensor subclass after it (torchao's `quantize_`: "AffineQuantizedTensor"), or torch's own
    quantized modules ("torch.ao dynamic": `quantize_dynamic`). None for plain weights. A
    quantized matmul changes a step's cost and so what a skipped block saves."""
    import torch

    model = denoiser(pipe)
    config = getattr(getattr(model, "config", None), "quantization_config", None) \
        or getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if config is not None:
        get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
        method = str(getattr(get("quant_method"), "value", get("quant_method")) or "quantized")
        detail = get("quant_type") or get("weights_dtype") or \
            ("4bit" if get("load_in_4bit") else "8bit" if get("load_in_8bit") else None)
        return f"{method} {getattr(detail, '__name__', detail)}" if detail else method
    kinds = set()
    for module in model.modules():
        path = type(module).__module__
        if path.startswith("torch.ao.nn.quantized") and "PackedParams" not in type(module).__name__:
            kinds.add("torch.ao dynamic" if ".dynamic." in path else "torch.ao static")
        kinds |= {type(p).__name__ for p in module.parameters(recurse=False)
                  if type(p) not in (torch.nn.Parameter, torch.Tensor)}
    return ", ".join(sorted(kinds)) or None


def dtype_of(pipe) -> str:
    """The denoiser's dtype as records write it ("float16"): what a trial computes in."""
    return str(denoiser(pipe).dtype).removeprefix("torch.")


def scheduler_of(pipe) -> str | None:
    """The class name of the scheduler `pipe` runs (part of the deployment context: what a
    skipped or dropped step is worth depends on the solver)."""
    scheduler = getattr(pipe, "scheduler", None)
    return type(scheduler).__name__ if scheduler is not None else None


def scheduler_class_name(name: str | None) -> str | None:
    """diffusers' class name of a spec's `model.scheduler` ("DDIM" -> "DDIMScheduler")."""
    if not name:
        return None
    return name if name.endswith("Scheduler") else f"{name}Scheduler"


def native_size(pipe) -> tuple[int, int] | None:
    """(height, width) a call without them generates, as diffusers' image pipelines derive it
    (`default_sample_size`, else the UNet's `sample_size`, times `vae_scale_factor`); None where
    the pipeline says otherwise (a video pipeline's call names its own defaults)."""
    scale = getattr(pipe, "vae_scale_factor", None)
    sample = getattr(pipe, "default_sample_size", None)
    if sample is None and getattr(pipe, "unet", None) is not None:
        sample = getattr(pipe.unet.config, "sample_size", None)
    if not isinstance(scale, int) or sample is None:
        return None
    height, width = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return height * scale, width * scale


def execution_device(pipe) -> torch.device:
    """Where the pipeline computes: `pipe.device` says "cpu" (or "meta") for an offloaded
    pipeline whose weights wait on the host; diffusers' `_execution_device` reads the hooks."""
    import torch

    try:
        device = torch.device(pipe._execution_device)
    except Exception:  # not a DiffusionPipeline, or no module to read it from
        device = torch.device(pipe.device)
    return torch.device("cpu") if device.type == "cpu" else device  # offload says "cpu:0"


def compiled_how(model) -> str:
    """How a denoiser is compiled, as `[model] compile` says it: "full" (torch.compile of the
    whole module), "regional" (some of its blocks, e.g. compile_repeated_blocks) or "none"."""
    if hasattr(model, "_orig_mod") or getattr(model, "_compiled_call_impl", None) is not None:
        return "full"
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()):
        return "regional"
    return "none"


def denoisers(pipe) -> list[torch.nn.Module]:
    """Every network the steps run: the denoiser and, on Wan 2.2's A14B pipelines, the second
    expert (`transformer_2`, which runs the low-noise steps). A cache applies to each, as a
    server enables it on each."""
    second = getattr(pipe, "transformer_2", None)
    return [denoiser(pipe)] if second is None else [denoiser(pipe), second]


def hooked_blocks(model) -> list[torch.nn.Module]:
    """The blocks diffusers' block caches (FirstBlockCache, MagCache) hook, in order: those of
    every block list its identifiers name (`transformer_blocks`, `single_transformer_blocks`, ...)."""
    import torch
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

    return [block for name, child in model.named_children()
            if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList)
            for block in child]


def unregistered_block_problem(family: str, pipe) -> str | None:
    """diffusers' block caches read each hooked block's outputs by its class's registered
    metadata: a class its registry lacks (a model newer than its registry, a subclass a user's
    patch put in) fails as soon as the cache is enabled ("Model class ... not registered")."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except ImportError:  # another diffusers: its own enable_cache decides
        return None
    for model in denoisers(pipe):
        for block in hooked_blocks(model):
            try:
                TransformerBlockRegistry.get(type(block))
            except ValueError:
                return (f"{family} cannot run on {type(model).__name__}: diffusers' {family} reads "
                        f"each block's outputs by its registered class, and knows no "
                        f"{type(block).__name__}; search dbcache (cache-dit) or taylorseer instead")
    return None


class HookPatch:
    """A diffusers cache applied to each of `pipe`'s denoisers by `enable`, removed by `disable`.
    `count`: wrap the hooks to count the calls that ran (None: where the denoiser is not
    compiled)."""

    def __init__(self, pipe, enable: Callable[[torch.nn.Module], None],
                 disable: Callable[[torch.nn.Module], None], count: bool | None = None):
        self.pipe, self.modules = pipe, denoisers(pipe)
        self.module = self.modules[0]
        self._naming: list = []  # the hooks that name each call where the loop names none
        if count is None:
            count = compiled_how(self.module) == "none"
        self.counting = count
        self._disable = disable
        self._before = {(id(m), name) for m in self.submodules() for name in _LEFT_BY_HOOKS
                        if name in m.__dict__}
        self._had_config = ["_cache_config" in module.__dict__ for module in self.modules]
        self._enabled: list[torch.nn.Module] = []
        try:
            for module in self.modules:
                enable(module)
                self._enabled.append(module)
        except BaseException:  # the second expert refused it: the first is left as it was
            self.restore()
            raise
        # PAB and FasterCache keep plain state; the others key it by the loop's cache context
        self.names_calls = sets_cache_context(pipe) or not self._keyed_by_context()
        self._name_calls()
        self.calls = self.computed = 0  # hooked modules' calls in the last call, and those run
        for module in self.submodules() if count else ():
            registry = module.__dict__.get("_diffusers_hook")
            for hook in (registry.hooks.values() if registry is not None else ()):
                if getattr(hook, "fn_ref", None) is not None and hasattr(hook.fn_ref, "original_forward"):
                    hook.fn_ref.pre_forward = self._count("calls", hook.fn_ref.pre_forward)
                    hook.fn_ref.original_forward = self._count("computed",
                                                               hook.fn_ref.original_forward)

    def submodules(self):
        """Every module of every denoiser, each expert's in turn."""
        for module in self.modules:
            yield from module.modules()

    def _count(self, counter: str, function):
        def counted(*args, **kwargs):
            setattr(self, counter, getattr(self, counter) + 1)
            return function(*args, **kwargs)
        return counted

    def computed_fraction(self, told: Callable[[], float | None] | None = None) -> float | None:
        """The share of the hooked modules' calls (the attention layers or blocks the cache may
        skip) that really ran in the last call; None when nothing hooked was called. Where the
        hooks are not counted (a compiled denoiser), what the family tells from what it measured
        (`told()`), if it can."""
        if not self.counting:
            return told() if told is not None else None
        return self.computed / self.calls if self.calls else None

    def prepare(self, call_kwargs: dict) -> None:
        from diffusers.hooks import HookRegistry

        self.calls = self.computed = 0
        for module in self.modules:
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks(recurse=True)
        if not self.names_calls and runs_separate_cfg(self.pipe, call_kwargs):
            raise ValueError(f"{type(self.pipe).__name__} names no cache context and runs "
                             "guidance as separate transformer calls: diffusers' caches would "
                             "mix them (use dbcache, cache-dit's, or no true CFG)")

    def _keyed_by_context(self) -> bool:
        from diffusers.hooks.hooks import StateManager

        return any(isinstance(value, StateManager)
                   for module in self.submodules()
                   for hook in getattr(module.__dict__.get("_diffusers_hook"), "hooks", {}).values()
                   for value in vars(hook).values())

    def _name_calls(self) -> None:
        """Where the loop names no call, each denoiser call runs in the cache context "cond", as
        FLUX's own loop does (diffusers' hooks key their state by it; one call a step, nothing
        mixed). The Python export registers the same two hooks."""
        if self.names_calls:
            return
        for module in self.modules:
            self._naming += [module.register_forward_pre_hook(enter_cond_context),
                             module.register_forward_hook(leave_cache_context)]

    def restore(self) -> None:
        while self._naming:
            self._naming.pop().remove()
        for module in self.modules:  # left where a call failed inside the context
            module.__dict__.pop("_optsearch_context", None)
        while self._enabled:
            self._disable(self._enabled.pop())
        for module in self.submodules():
            for name in _LEFT_BY_HOOKS:
                if name in module.__dict__ and (id(module), name) not in self._before:
                    del module.__dict__[name]
        for module, had_config in zip(self.modules, self._had_config, strict=True):
            if not had_config:
                module.__dict__.pop("_cache_config", None)


def cache_patch(pipe, config, family: str, count: bool | None = None) -> HookPatch:
    """Enable a diffusers cache config through each denoiser's own `enable_cache` (CacheMixin):
    the same on each, or from a list, one per denoiser in turn (MagCache's per expert)."""
    modules = denoisers(pipe)
    lacking = [module for module in modules if not hasattr(module, "enable_cache")]
    if lacking:
        raise ValueError(f"{family} needs a denoiser with diffusers' enable_cache "
                         f"({type(lacking[0]).__name__} has none)")
    configs = config if isinstance(config, list) else [config] * len(modules)
    if len(configs) != len(modules):
        raise ValueError(f"{family}: {len(configs)} configs for {len(modules)} denoisers")
    by_module = {id(module): each for module, each in zip(modules, configs, strict=True)}
    return HookPatch(pipe, lambda m: m.enable_cache(by_module[id(m)]), lambda m: m.disable_cache(),
                     count)


def first_expert_steps(pipe, steps: int) -> list[int]:
    """How many of a call's steps Wan 2.2 A14B's first expert runs, for 1 to `steps` steps: the
    timesteps at or above its boundary (`boundary_ratio` of the scheduler's training steps), as
    the pipeline decides, on one copy of its scheduler."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    boundary = pipe.config.boundary_ratio * scheduler.config.num_train_timesteps
    split = []
    for count in range(1, steps + 1):
        scheduler.set_timesteps(count)
        split.append(int((scheduler.timesteps >= boundary).sum()))
    return split


def cpu_safe_dtype(pipe) -> torch.dtype | None:
    """float32 for cache factors on CPU (bfloat16 there is slow); diffusers' default elsewhere."""
    import torch

    return torch.float32 if execution_device(pipe).type == "cpu" else None
