"""A step-distilled LoRA (Lightning, Hyper-SD, FLUX.1-Turbo, lightx2v): the denoiser taught to
finish in a few steps, usually with classifier-free guidance off. It competes with the caches, so
a study weighs it against them, and beside them (Qwen-Image-Lightning with DBCache).

The family loads the LoRA as an adapter (diffusers' `load_lora_weights` and `set_adapters`),
swaps in the scheduler its recipe runs with where one is given (Lightning's shift, LCM's class),
and, unless `cfg` is kept, turns guidance off in each call (`prepare`). Its step count is the `steps`
family's: a combo runs it with `steps`, drawn from the LoRA's own range where the spec gives one
(`STEPS`). `restore()` unloads the adapter, which leaves the layers
as they were (peft's wrappers give the original modules back). With `fuse`, the LoRA is fused
into the weights, as most servers run it (no work added per step); unfusing in half precision
does not give back the same weights, so the adapted layers' weights are kept on the CPU
beforehand and copied back. In a search that copy is made once per layer and process (`_KEPT`,
`keep_between_applies`), not per trial: for Qwen-Image it is about the whole transformer (some
40 GB each way). It is not what a server holds, so a CPU's peak-memory figure leaves it out
(`kept_bytes`); elsewhere (`optsearch.apply` in a server) `restore()` frees it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import weakref
from collections.abc import Iterator, Mapping

from optsearch.accelerators.base import Param, as_list
from optsearch.accelerators.calls import call_parameters, runs_separate_cfg
from optsearch.errors import ModelLoadError, first_line

NAME = "distill"
APPLIES_TO = ("unet", "transformer", "video")
ADAPTER = "optsearch-distill"
PARAMS = (
    Param("lora", str, ("",), help="the step-distilled LoRA: a hub id, folder or .safetensors file"),
    Param("weight_name", str, ("",), help="its file in a repo or folder that holds several"),
    Param("lora_2", str, ("",), help="Wan 2.2's second (low-noise) expert's LoRA, beside lora "
          "(the high-noise one's): lightx2v ships the two as files of one repo"),
    Param("weight_name_2", str, ("",), help="lora_2's file in a repo or folder of several"),
    Param("lora_scale", float, (1.0,), minimum=0.0, help="the adapter's weight"),
    Param("fuse", bool, (False,), choices=(False, True),
          help="fused into the weights, as most servers run it (true), or kept as an adapter"),
    Param("cfg", bool, (False,), choices=(False, True),
          help="keep classifier-free guidance (false: off, as most distilled LoRAs are run)"),
    Param("scheduler_config", str, ("",), help="the scheduler settings its recipe runs with, over "
          "the model's: a JSON object or file (\"_class_name\": another class, e.g. LCMScheduler)"),
)
# The LoRA's own step counts (`[space.distill] num_inference_steps`): a spec key, not a
# parameter of `apply`. Where given, a combo with distill draws its `steps` from it (Optuna's
# parameter "distill.num_inference_steps"), so steps alone keeps space.steps' range: the
# fewer-steps line at 20-50 steps beside Lightning at 4-8, in one study.
STEPS = Param("num_inference_steps", int, (), minimum=1,
              help="the steps a combo with distill draws (default: space.steps')")
SAME_COMPUTATION = "same LoRA"


def recipe_name(recipe: Mapping) -> str:
    """A recipe's name, as the trial parameter "distill.recipe" draws it: its `name`, else its
    file (weight_name, else lora) without ".safetensors"."""
    named = recipe.get("name") or recipe.get("weight_name") or recipe.get("lora") or ""
    return str(named).removesuffix(".safetensors")


LORA_FILES = ("lora", "weight_name", "lora_2", "weight_name_2")  # which LoRA a setting loads


def lora_key(params: Mapping) -> str:
    """The LoRA files a distill setting loads, as one name ("repo/file", "+" the second
    expert's), and the scheduler its recipe swaps in, where one does ("... with scheduler
    {...}"): what an "auto" range calibrated on that distilled model is kept under (one file
    run with two schedulers denoises along two paths, whose differences differ)."""
    def named(source: str, file: str) -> str:
        return "/".join(str(part) for part in (source, file) if part)

    first, second = (named(params.get(source) or "", params.get(file) or "")
                     for source, file in (LORA_FILES[:2], LORA_FILES[2:]))
    scheduler = params.get("scheduler_config")
    return first + (f" + {second}" if second else "") + (f" with scheduler {scheduler}" if scheduler else "")


def load_adapter(pipe, source: str, weight_name: str | None, adapter: str,
                 second_expert: bool = False) -> None:
    """Load one LoRA as the adapter `adapter` (into Wan 2.2's second expert with
    `second_expert`): a .safetensors file (its folder and name), or a hub id or folder (its
    `weight_name` file where it holds several). ModelLoadError, one line, when it cannot be loaded or
    adapts no layer of the pipeline (diffusers loads a LoRA for another model silently)."""
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        source, weight_name = os.path.dirname(path) or ".", os.path.basename(path)
    into = {"load_into_transformer_2": True} if second_expert else {}
    try:
        with _quiet_absent_components():
            pipe.load_lora_weights(source, weight_name=weight_name or None, adapter_name=adapter,
                                   **into)
    except Exception as error:  # not there, unreachable (the hub's own errors), another format
        hub = "" if os.path.exists(os.path.expanduser(source)) else \
            " (a hub id: is the hub reachable from here, or the LoRA in its local cache?)"
        raise ModelLoadError(f"cannot load LoRA {source!r} into {type(pipe).__name__}: "
                             f"{type(error).__name__}: {first_line(error)}{hub}") from error
    adapted = pipe.get_list_adapters()
    if not any(adapter in names for component, names in adapted.items()
               if component == "transformer_2" or not second_expert):
        raise ModelLoadError(f"LoRA {source!r} adapts no layer of {type(pipe).__name__}: a LoRA "
                             "for another model?")


class _AbsentComponents(logging.Filter):
    """Drops diffusers' "No LoRA keys associated to CLIPTextModel ... safe to ignore": a
    distilled LoRA adapts the denoiser only, and every trial loads it again."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated")


@contextlib.contextmanager
def _quiet_absent_components() -> Iterator[None]:
    """diffusers' LoRA loaders without that one message, for the load only (its other warnings,
    keys it could not place, still show)."""
    quiet = _AbsentComponents()
    loggers = [logging.getLogger(f"diffusers.loaders.{name}")
               for name in ("lora_base", "lora_pipeline", "peft")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def guidance_off(pipe, call_kwargs: dict) -> dict:
    """The call's guidance arguments that run classifier-free guidance, set to 1.0 (off): where
    the call takes a true_cfg_scale (Qwen-Image, FLUX) that one, elsewhere guidance_scale (SD,
    SD3, Wan, and Wan 2.2's guidance_scale_2). FLUX's guidance_scale is embedded in the
    transformer, not a second pass: it stays. Returns what it changed (the export sets the same)."""
    parameters = call_parameters(pipe)
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    embedded = getattr(getattr(denoiser, "config", None), "guidance_embeds", False) is True
    keys = ("true_cfg_scale",) if "true_cfg_scale" in parameters else \
        () if embedded else ("guidance_scale", "guidance_scale_2")
    changed = {}
    for key in keys:
        value = call_kwargs.get(key, parameters[key].default if key in parameters else None)
        if value is not None and float(value) > 1.0:
            changed[key] = 1.0
    call_kwargs.update(changed)
    if changed:
        call_kwargs.pop("negative_prompt", None)  # unused without guidance (Qwen warns of it)
    return changed


def scheduler_overrides(given: str) -> dict:
    """The scheduler settings given as one JSON object, or the path of a JSON file of one (a
    spec holds the object itself: a worker on another machine reads it from the study);
    ValueError, one line, otherwise."""
    try:
        if given.lstrip().startswith("{"):
            overrides = json.loads(given)
        else:
            with open(os.path.expanduser(given), encoding="utf-8") as file:
                overrides = json.load(file)
    except OSError as error:
        raise ValueError(f"distill.scheduler_config {given!r}: {error.strerror or error}") from error
    except ValueError as error:
        raise ValueError(f"distill.scheduler_config {given!r}: not JSON ({error})") from error
    if not isinstance(overrides, dict):
        raise ValueError(f"distill.scheduler_config {given!r} must hold one JSON object")
    return overrides


def scheduler_with(scheduler, overrides: dict):
    """The scheduler of the recipe: the model's config with `overrides`, in the class they name.
    The overrides go as keywords: in the config dict itself, diffusers drops each key the model's
    config took by default (`_use_default_values`), so a shift the model never wrote down stayed
    the default."""
    import diffusers

    if problem := scheduler_problem(scheduler, overrides):
        raise ValueError(problem)
    settings = dict(overrides)
    return getattr(diffusers, settings.pop("_class_name", type(scheduler).__name__)).from_config(
        scheduler.config, **settings)


def scheduler_problem(scheduler, overrides: dict) -> str | None:
    """A recipe's scheduler settings that diffusers would not take: a class it lacks, or a
    setting the class has not (a typo, "shfit", is ignored with a log line, and the study
    would measure the model's own scheduler under the recipe's name). Keys that start with "_"
    (a copied scheduler_config.json's `_diffusers_version`) are diffusers' own."""
    import inspect

    import diffusers

    name = overrides.get("_class_name", type(scheduler).__name__)
    scheduler_class = getattr(diffusers, str(name), None)
    if not isinstance(scheduler_class, type) or not hasattr(scheduler_class, "from_config"):
        return f"distill.scheduler_config: diffusers has no scheduler {name!r}"
    parameters = inspect.signature(scheduler_class.__init__).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    unknown = sorted(key for key in overrides if not key.startswith("_") and key not in parameters)
    if unknown:
        return (f"distill.scheduler_config: {name} takes no setting {', '.join(map(repr, unknown))} "
                f"(its settings: {', '.join(p for p in parameters if p != 'self')})")
    return None


class DistillPatch:
    """The LoRA loaded as an adapter, the recipe's scheduler in place of the model's; guidance
    off in each call unless `cfg`."""

    def __init__(self, pipe, lora: str, weight_name: str, lora_2: str, weight_name_2: str,
                 lora_scale: float, fuse: bool, cfg: bool, scheduler_config: str):
        self.pipe, self.cfg, self.scheduler = pipe, cfg, pipe.scheduler
        self.told: dict = {}
        self.kept: list = []  # (layer, its weight and bias before fusing), to copy back
        self.fraction: float | None = None
        self.overrides = scheduler_overrides(scheduler_config) if scheduler_config else {}
        recipe = scheduler_with(pipe.scheduler, self.overrides) if self.overrides else None
        try:  # a second LoRA or the fusing that fails leaves the pipeline as it was
            load_adapter(pipe, lora, weight_name, ADAPTER)
            if lora_2:  # one adapter name, in each expert (diffusers keeps adapters per model)
                load_adapter(pipe, lora_2, weight_name_2, ADAPTER, second_expert=True)
            pipe.set_adapters([ADAPTER], adapter_weights=[lora_scale])
            if fuse:
                self.kept = [(layer, kept_weights(layer)) for layer in _adapted_layers(pipe)]
                pipe.fuse_lora(adapter_names=[ADAPTER], lora_scale=1.0)  # at the scale just set
                pipe.unload_lora_weights()  # the fused weights stay in the original layers
        except BaseException:
            self.restore()
            raise
        if recipe is not None:
            pipe.scheduler = recipe

    def prepare(self, call_kwargs: dict) -> None:
        """Guidance off (unless kept): half the denoiser's work where it ran two passes."""
        if self.cfg:
            self.fraction = 1.0
            return
        guided = runs_separate_cfg(self.pipe, call_kwargs)
        self.told = guidance_off(self.pipe, call_kwargs)
        self.fraction = 0.5 if guided and not runs_separate_cfg(self.pipe, call_kwargs) else 1.0

    def computed_fraction(self) -> float | None:
        return self.fraction

    def ran_with(self) -> dict:
        """The guidance arguments and scheduler settings the calls ran with, for the export."""
        return {key: value for key, value in (("call", dict(self.told)), ("scheduler", self.overrides))
                if value}

    def restore(self) -> None:
        """The model's scheduler back, and the adapter unloaded: peft's wrappers give the
        original layers back, bit for bit."""
        self.pipe.scheduler = self.scheduler
        if ADAPTER in {name for names in self.pipe.get_list_adapters().values() for name in names}:
            self.pipe.unload_lora_weights()
        for layer, weights in self.kept:  # the weights before fusing, bit for bit
            for name, kept in weights.items():
                getattr(layer, name).data.copy_(kept)
            if not _keep_between_applies:
                _KEPT.pop(layer, None)
        self.kept = []


# Each adapted layer's weights before fusing, on the CPU, kept for the process's later trials: a
# trial restores them exactly, so the copy stays right. Weak keys: it goes with its layer.
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROBE = 1024  # elements of the weight compared before a kept copy is used again
_keep_between_applies = False


def keep_between_applies(keep: bool = True) -> None:
    """Keep the copies after `restore()` for the next fused trial (a search: `Evaluator` sets
    it); otherwise restoring frees them, as a server that applies a setting once expects."""
    global _keep_between_applies
    _keep_between_applies = keep


def _probe(tensor) -> object:
    """Some 1024 evenly spaced elements of `tensor`, on the CPU: a weight changed since its copy
    was kept (another LoRA fused, new weights loaded) differs in them."""
    flat = tensor.detach().reshape(-1)
    return flat[::max(1, flat.numel() // _PROBE)].to("cpu", copy=True)


def kept_weights(layer) -> dict:
    """{"weight": ..., "bias": ...} of `layer` on the CPU: the copy kept from an earlier trial
    while the layer still holds those weights (shape, dtype, and a probe of its elements), else
    a new one."""
    import torch

    current = {name: tensor for name, tensor in (("weight", layer.weight), ("bias", layer.bias))
               if tensor is not None}
    kept = _KEPT.get(layer)
    if kept is None or kept["weights"].keys() != current.keys() \
            or any(kept["weights"][name].shape != tensor.shape or kept["weights"][name].dtype != tensor.dtype
                   for name, tensor in current.items()) \
            or not torch.equal(kept["probe"], _probe(layer.weight)):
        kept = {"weights": {name: tensor.detach().to("cpu", copy=True)
                            for name, tensor in current.items()},
                "probe": _probe(layer.weight)}
        _KEPT[layer] = kept
    return kept["weights"]


def kept_bytes() -> int:
    """Bytes of the weights kept on the CPU for unfusing: measurement's, not what a server holds."""
    return sum(tensor.nbytes for kept in list(_KEPT.values()) for tensor in kept["weights"].values())


def adapted_bytes(pipe) -> int:
    """Bytes of the layers the loaded adapter wraps (their weights and biases): what fusing it
    keeps on the CPU to unfuse, read without copying."""
    return sum(tensor.nbytes for layer in _adapted_layers(pipe)
               for tensor in (layer.weight, layer.bias) if tensor is not None)


def _adapted_layers(pipe) -> list:
    """The base layer of every layer the adapter wraps, in every component (a LoRA may adapt a
    text encoder too)."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module.get_base_layer() for component in pipe.components.values()
            if isinstance(component, torch.nn.Module) for module in component.modules()
            if isinstance(module, BaseTunerLayer) and ADAPTER in module.active_adapters]


def apply(pipe, lora: str = "", weight_name: str = "", lora_2: str = "", weight_name_2: str = "",
          lora_scale: float = 1.0, fuse: bool = False, cfg: bool = False, scheduler_config: str = "",
          **_recorded) -> DistillPatch:
    """`_recorded`: what a trial ran with (the guidance it turned off), passed back by an export."""
    if not lora:
        raise ValueError("distill.lora is required: the step-distilled LoRA's hub id, folder or "
                         ".safetensors file")
    return DistillPatch(pipe, lora, weight_name, lora_2, weight_name_2, float(lora_scale), bool(fuse),
                        bool(cfg), scheduler_config)


def problem_with(pipe, values) -> str | None:
    """A pipeline without diffusers' LoRA loader; Wan 2.2's two experts without a LoRA for the
    second (each takes its own), or lora_2 on one denoiser; or one that holds adapters already
    (restoring would unload them too). `values`: a setting's, or the study's lists of them."""
    second = (values or {}).get("lora_2") or ""
    second = second[0] if isinstance(second, list) else second
    if not hasattr(pipe, "load_lora_weights"):
        return f"distill: {type(pipe).__name__} has no LoRA loader in diffusers"
    two_experts = getattr(pipe, "transformer_2", None) is not None
    if two_experts and not second:
        return ("distill on Wan 2.2's two experts: give lora_2, the low-noise expert's LoRA, beside "
                "lora, the high-noise one's (lightx2v ships high_noise_model and low_noise_model)")
    if second and not two_experts:
        return f"distill.lora_2 is for Wan 2.2's second expert; {type(pipe).__name__} has one denoiser"
    if any(pipe.get_list_adapters().values()):
        return ("distill: the pipeline holds LoRA adapters already (model.lora); fuse them "
                "(model.fuse_lora = true) so the distilled LoRA can be loaded and unloaded alone")
    for given in (given for given in as_list((values or {}).get("scheduler_config")) if given):
        try:
            if problem := scheduler_problem(pipe.scheduler, scheduler_overrides(given)):
                return problem
        except ValueError as error:  # not JSON, or no such file (`evaluate --set`)
            return str(error)
    return None


def context_it_sets(values: Mapping | None) -> tuple[str, ...]:
    """The deployment context a distill setting sets itself (guidance off, the recipe's
    scheduler): a call that serves it otherwise is not served at another context."""
    if not values:
        return ()
    guidance = () if values.get("cfg") else ("guidance_scale", "guidance_scale_2", "true_cfg_scale")
    return guidance + (("scheduler",) if values.get("scheduler_config") else ())


def max_speedup(model_steps: int, cfg: bool = False, **_) -> float:
    """Guidance off halves the denoiser's work at most; the LoRA itself adds work."""
    return 1.0 if cfg else 2.0


def warmup_steps(**_) -> int:
    return 0
