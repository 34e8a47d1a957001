"""Pipeline loading: hub ids and local folders (as users do), `module:function` factories, and the
builtin offline models (builtin.py), on the device and dtype the spec asks for."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass

import diffusers
import torch

from optsearch.accelerators import execution_device, not_a_pipeline, offload_of, scheduler_class_name
from optsearch.errors import ModelLoadError, first_line
from optsearch.measure.builtin import build_builtin
from optsearch.measure.devices import resolve_device
from optsearch.measure.hub import missing, offline_reason
from optsearch.measure.model_ids import check_folder, is_factory, model_kind

logger = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# what each kind is served in
AUTO_DTYPE = {"unet": "float16", "transformer": "bfloat16", "video": "bfloat16"}


@dataclass(frozen=True)
class Placement:
    """Where a pipeline runs and in which precision, after resolving 'auto' and CPU limits."""

    device: torch.device
    dtype: torch.dtype


def resolve_placement(device: str, dtype: str, kind: str | None = None) -> Placement:
    """Resolve `auto` to cuda when available; force float32 on CPU (half is slow or unsupported).
    dtype `auto`: float16 for UNets, bfloat16 for diffusion transformers (as they are served)."""
    asked_for_auto = dtype == "auto"
    if asked_for_auto:
        dtype = AUTO_DTYPE[kind or "unet"]
    torch_device = resolve_device(device)
    torch_dtype = DTYPES[dtype]
    if torch_device.type == "cpu" and torch_dtype != torch.float32:
        if asked_for_auto:
            return Placement(torch_device, torch.float32)
        warnings.warn(f"dtype {dtype} is not used on CPU: running in float32", stacklevel=2)
        torch_dtype = torch.float32
    return Placement(torch_device, torch_dtype)


def set_scheduler(pipe, name: str) -> None:
    """Replace the scheduler by diffusers' `<name>Scheduler`, built from the model's own config."""
    class_name = scheduler_class_name(name)
    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None:
        raise ModelLoadError(f"unknown scheduler {name!r}")
    own = type(pipe.scheduler)
    compatible = sorted(cls.__name__ for cls in getattr(pipe.scheduler, "compatibles", [own]))
    if class_name not in compatible:  # a warning: some work though not listed (LCM on SD 1.5)
        listed = ", ".join(compatible) if len(compatible) <= 3 else f"{len(compatible)} of them"
        warnings.warn(f"model.scheduler = {name!r}: the model's {own.__name__} does not list "
                      f"{class_name} among the schedulers compatible with it ({listed}): the "
                      "pipeline may refuse it", stacklevel=2)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)


def build_from_factory(model_id: str, placement: Placement, factory_path: str | None = None):
    """Import `module.path`, call `function(device=..., dtype=...)` and check it gave a pipeline.

    The module is imported from `factory_path` (the spec's folder: `model.factory_path`), the
    working directory or PYTHONPATH, in every worker process, so a LoRA-fused or otherwise custom
    pipeline can be searched by many workers.
    """
    module_name, _, function_name = model_id.partition(":")
    for folder in (os.getcwd(), factory_path):  # the spec's folder first
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or the module's own failure while importing
        where = f"{factory_path}, the working directory" if factory_path else "the working directory"
        raise ModelLoadError(f"model.id {model_id!r}: cannot import {module_name!r} (from "
                             f"{where} or PYTHONPATH): {first_line(error)}") from error
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ModelLoadError(f"model.id {model_id!r}: {module_name!r} has no function "
                             f"{function_name!r}")
    try:
        pipe = factory(device=placement.device, dtype=placement.dtype)
    except Exception as error:
        raise ModelLoadError(f"model.id {model_id!r}: the factory failed: "
                             f"{type(error).__name__}: {first_line(error)}") from error
    problem = not_a_pipeline(pipe)
    if problem:
        raise ModelLoadError(f"model.id {model_id!r}: the factory returned {problem}")
    return pipe


def load_pipeline(model_id: str, device: str = "auto", dtype: str = "float16",
                  scheduler: str | None = None, kind: str | None = None,
                  factory_path: str | None = None, image_to_image: bool = False,
                  controlnet: str | list[str] | None = None):
    """Load a diffusers pipeline once per process: builtin name, `module:function` factory,
    local folder or hub id. `kind` ("unet"/"transformer"/"video") when known better than from the id;
    `factory_path` the folder a factory's module is imported from. `image_to_image` (the spec
    sets a strength): a folder or hub id whose pipeline is text-to-image (FLUX.1 [dev], SD 1.5)
    loads as its image-to-image pipeline, on the same components. `controlnet`: the hub id or
    folder of a ControlNet the pipeline is served with, or a list of them (its ControlNet
    pipeline, `with_controlnet`)."""
    kind = kind or model_kind(model_id)
    placement = resolve_placement(device, dtype, kind)
    if model_id.startswith("builtin:"):
        pipe = build_builtin(model_id)
    elif is_factory(model_id):
        pipe = build_from_factory(model_id, placement, factory_path)
    else:
        pipe = _load_pretrained(model_id, placement.dtype, kind)
        if controlnet:
            pipe = with_controlnet(pipe, controlnet, placement.dtype)
        if image_to_image:
            pipe = as_image_to_image(pipe)
    if scheduler:
        set_scheduler(pipe, scheduler)
    offload = offload_of(pipe)
    if offload is None:
        pipe = pipe.to(placement.device)
    else:  # `.to` would undo diffusers' model offload (and refuses the sequential one)
        logger.info("the pipeline comes with %s offload: measured as built, on %s", offload,
                    execution_device(pipe))
    if model_id.startswith("builtin:") and placement.dtype != torch.float32:
        pipe = pipe.to(dtype=placement.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _published_class(source: str) -> str:
    """The pipeline class a folder or hub id publishes (its model_index.json), "" where unknown
    here (not downloaded yet: the loader then says why)."""
    try:
        return diffusers.DiffusionPipeline.load_config(source).get("_class_name", "")
    except Exception:  # noqa: BLE001 - whatever it is, loading the pipeline says it better
        return ""


# the ControlNet model class of each denoiser diffusers has ControlNet pipelines for
CONTROLNET_CLASSES = {"UNet2DConditionModel": "ControlNetModel",
                      "FluxTransformer2DModel": "FluxControlNetModel",
                      "SD3Transformer2DModel": "SD3ControlNetModel",
                      "QwenImageTransformer2DModel": "QwenImageControlNetModel"}
# ... and the model that runs several of them, each on its own control image (multi-ControlNet;
# Qwen-Image's takes a single union ControlNet only, diffusers 0.42)
MULTI_CONTROLNET_CLASSES = {"ControlNetModel": "MultiControlNetModel",
                            "FluxControlNetModel": "FluxMultiControlNetModel",
                            "SD3ControlNetModel": "SD3MultiControlNetModel"}


def with_controlnet(pipe, controlnet: str | list[str], dtype: torch.dtype):
    """`pipe` as its ControlNet pipeline with the ControlNet at `controlnet` (hub id or folder),
    on the same components: diffusers' `AutoPipelineForText2Image.from_pipe(pipe, controlnet=)`.
    Several (a list) run as the family's multi-ControlNet model, in the list's order."""
    from diffusers import AutoPipelineForText2Image

    from optsearch.accelerators import denoiser

    name = CONTROLNET_CLASSES.get(type(denoiser(pipe)).__name__)
    if name is None:
        raise ModelLoadError(f"model.controlnet: diffusers has no ControlNet for "
                             f"{type(denoiser(pipe)).__name__} ({type(pipe).__name__})")

    def load(source: str):
        return getattr(diffusers, name).from_pretrained(source, **dtype_option(dtype))

    sources = [controlnet] if isinstance(controlnet, str) else controlnet
    if len(sources) > 1 and name not in MULTI_CONTROLNET_CLASSES:
        raise ModelLoadError(f"model.controlnet: diffusers runs one {name} at a time (its multi "
                             "model takes a single union ControlNet); name one")
    models = [from_hub_or_folder(source, "model.controlnet", "model.controlnet", load,
                                  loaded_as=f" as a {name}") for source in sources]
    model = models[0] if len(models) == 1 else getattr(diffusers, MULTI_CONTROLNET_CLASSES[name])(models)
    return AutoPipelineForText2Image.from_pipe(pipe, controlnet=model)


LORA_ADAPTER = "optsearch"  # the adapter name the spec's LoRA is loaded under


def with_lora(pipe, loras: list[tuple[str, float]], weight_name: str | None = None,
              fuse: bool = False):
    """`pipe` with each LoRA of `loras` (hub id, folder or .safetensors file, and its scale), as
    served: kept as adapters (diffusers' `load_lora_weights` and `set_adapters`: each adapted
    layer adds its low-rank products at every call), or fused into the weights at their scales
    and the adapters unloaded (`fuse_lora`: no work added). The two run at different speeds, so
    the study times the one served. `weight_name`: the file of a single LoRA's repo or folder."""
    if not hasattr(pipe, "load_lora_weights"):
        raise ModelLoadError(f"model.lora: {type(pipe).__name__} has no LoRA loader in diffusers")
    if getattr(pipe, "transformer_2", None) is not None:  # loaded into the first expert only
        raise ModelLoadError("model.lora: Wan 2.2's two experts each take their own LoRA: load them "
                             "in a factory (load_lora_weights(..., load_into_transformer_2=True) "
                             "for the second)")
    names = [LORA_ADAPTER if len(loras) == 1 else f"{LORA_ADAPTER}-{i}" for i in range(len(loras))]
    for name, (source, _) in zip(names, loras, strict=True):
        _load_lora(pipe, source, weight_name, name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    if fuse:  # at the scales just set
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    return pipe


def _load_lora(pipe, source: str, weight_name: str | None, name: str) -> None:
    path = os.path.expanduser(source)
    if os.path.isfile(path):  # a weight file: its folder, and its name
        source, weight_name = os.path.dirname(path) or ".", os.path.basename(path)

    def load(found: str):
        pipe.load_lora_weights(found, weight_name=weight_name, adapter_name=name)

    try:
        from_hub_or_folder(source, "model.lora", "model.lora", load, loaded_as=" as a LoRA")
    except (KeyError, RuntimeError) as error:  # a state dict that is not this model's LoRA
        raise ModelLoadError(f"cannot load model.lora {source!r} into {type(pipe).__name__}: "
                             f"{first_line(error)}") from error
    if not any(name in names for names in pipe.get_list_adapters().values()):
        raise ModelLoadError(f"model.lora {source!r} adapts no layer of {type(pipe).__name__}: "
                             "a LoRA for another model?")


def as_image_to_image(pipe):
    """The image-to-image pipeline of a text-to-image one, on its components (diffusers'
    `AutoPipelineForImage2Image.from_pipe`); `pipe` itself where it takes a strength already or
    has none (Kontext: the spec's strength is then refused in one line)."""
    from diffusers import AutoPipelineForImage2Image

    from optsearch.accelerators import call_parameters

    if "strength" in call_parameters(pipe):
        return pipe
    try:
        return AutoPipelineForImage2Image.from_pipe(pipe)
    except ValueError:  # no image-to-image pipeline of this class
        return pipe


def dtype_option(dtype: torch.dtype) -> dict:
    """`from_pretrained`'s keyword for the dtype: `dtype=` where diffusers takes it (newer ones
    warn "`torch_dtype` is deprecated" on every load), `torch_dtype=` where it is the only one
    (an older diffusers would not read `dtype=` and load float32)."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def _load_pretrained(model_id: str, torch_dtype: torch.dtype, kind: str | None = "unet"):
    # SD pipelines carry a safety checker that would black out images and cost time; others have none.
    extra = {"safety_checker": None} if kind == "unet" else {}

    def load(source: str):
        # imported here: the auto classes import every pipeline (~5 s), which built-in models never need
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

        # text-to-video pipelines (Wan, CogVideoX, HunyuanVideo) have no text-to-image auto class;
        # one published as image-to-image (SDXL's refiner: no first text encoder) loads as itself
        loader = diffusers.DiffusionPipeline if kind == "video" else \
            AutoPipelineForImage2Image if "Img2Img" in _published_class(source) else AutoPipelineForText2Image
        if torch_dtype == torch.float16:
            # Repos that publish half-precision files (SD 1.5, SDXL) as the "fp16" variant: half
            # the download. Repos without them raise "no such modeling files": load the default.
            try:
                return loader.from_pretrained(source, **dtype_option(torch_dtype), variant="fp16", **extra)
            except ValueError as error:
                if "variant" not in str(error):
                    raise
                logger.info("%s has no fp16 variant: loading its default files", model_id)
        return loader.from_pretrained(source, **dtype_option(torch_dtype), **extra)

    return from_hub_or_folder(model_id, "model", "model.id", load)


def from_hub_or_folder(model_id: str, what: str, key: str, load, loaded_as: str = ""):
    """`load(source)` of a hub id or local folder (the spec's `key`), each failure one line: a
    folder that does not exist, one the hub would give but cannot now (`missing`), or what
    loading said."""
    check_folder(model_id, what)
    path = os.path.expanduser(model_id)
    source = path if os.path.isdir(path) else model_id
    offline = None if os.path.isdir(path) else offline_reason()  # once, before any download
    try:
        return load(source)
    except (OSError, ValueError) as error:
        if offline:
            raise ModelLoadError(missing(
                f"{what} {model_id!r}", offline,
                f"download it where the hub is reachable (`hf download {model_id}`) and copy the "
                f"cache, or set {key} to a local folder")) from error
        raise ModelLoadError(f"cannot load {what} {model_id!r}{loaded_as}: {first_line(error)}") from error


