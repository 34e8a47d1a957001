"""Batched generation with per-prompt seeds, timed call by call.

Each prompt has its own torch.Generator seeded from (seed, prompt index), so a prompt's image does
not depend on the batch size or its position. A short warm-up runs untimed; only pipeline calls
are timed (synchronized on CUDA).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from optsearch.accelerators import AppliedSetting, call_parameters, denoised_steps, execution_device
from optsearch.accelerators.calls import true_cfg_ran
from optsearch.errors import PromptError
from optsearch.measure.compiling import compiled_as, graphs_compiled
from optsearch.measure.long_prompts import quiet_truncation
from optsearch.measure.prompts import conditioning_images, conditioning_masks, prompt_seed, reference_images


@dataclass(frozen=True)
class GenerationConfig:
    """What one pipeline call needs besides prompts: from the spec's [model] and [prompts]."""

    steps: int = 50
    height: int | None = None
    width: int | None = None
    guidance_scale: float = 7.5
    batch_size: int = 4
    seed: int = 42
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    num_frames: int | None = None  # video pipelines
    guidance_scale_2: float | None = None  # Wan 2.2 A14B: the low-noise expert's guidance
    strength: float | None = None  # image-to-image: the share of the steps that denoise
    call: Mapping = field(default_factory=dict)  # [model.call]: other arguments, as served

    @classmethod
    def from_spec(cls, spec, seed: int | None = None) -> GenerationConfig:
        """`seed`: the per-prompt generator seed base, when not the spec's prompts.seed."""
        model, prompts = spec.model, spec.prompts
        return cls(model.steps, model.height, model.width, model.guidance_scale,
                   prompts.batch_size, prompts.seed if seed is None else seed,
                   model.true_cfg_scale, model.negative_prompt, model.num_frames,
                   model.guidance_scale_2, model.strength, dict(model.call))

    def guidance_kwargs(self, count: int, pipe) -> dict:
        """The call arguments that decide guidance (a calibration tells a cache that follows the
        call, DBCache, whether guidance runs as separate calls), for `count` prompts."""
        return {"guidance_scale": guidance_for(pipe, self.guidance_scale),
                **self.extra_kwargs(count, pipe)}

    def steps_denoising(self, count: int) -> int:
        """The fewest steps (at most `steps`) a call needs for `count` of them to denoise: a
        short call (a warm-up, a calibration) at an image-to-image strength runs a share only."""
        if self.strength is None:
            return min(count, self.steps)
        return next((n for n in range(count, self.steps + 1)
                     if denoised_steps(n, self.strength) >= count), self.steps)

    def extra_kwargs(self, count: int, pipe) -> dict:
        """The optional call arguments the spec sets (Qwen-Image's true CFG and its negative, a
        video's frame count). With neither true CFG nor a negative prompt set, true_cfg_scale is
        passed as 1.0: Qwen-Image's default 4.0 without a negative runs no guidance anyway and
        warns on every call that it does not."""
        extra = {} if self.true_cfg_scale is None else {"true_cfg_scale": self.true_cfg_scale}
        if self.true_cfg_scale is None and self.negative_prompt is None \
                and "true_cfg_scale" in call_parameters(pipe):
            extra["true_cfg_scale"] = 1.0
        if self.negative_prompt is not None:
            extra["negative_prompt"] = [self.negative_prompt] * count
        if self.num_frames is not None:
            extra["num_frames"] = self.num_frames
        if self.guidance_scale_2 is not None:
            extra["guidance_scale_2"] = self.guidance_scale_2
        if self.strength is not None:
            extra["strength"] = self.strength
        extra.update(self.call)
        nets = controlnets(pipe)
        scale = extra.get("controlnet_conditioning_scale", 1.0)
        if nets > 1 and not isinstance(scale, list):  # FLUX's and SD3's fail on a number
            extra["controlnet_conditioning_scale"] = [scale] * nets
        if self.height and self.width and "max_area" in call_parameters(pipe):
            # FLUX Kontext sizes its output by max_area (default 1024 x 1024): the spec's size
            extra["max_area"] = self.height * self.width
        return extra

    def true_cfg_ran(self, pipe) -> float | None:
        """The true CFG scale these calls run (1.0 without a negative prompt), where the
        pipeline has one: the deployment context's."""
        return true_cfg_ran(pipe, (), self.extra_kwargs(1, pipe))


# pipelines that condition every prompt of a call on one image (Wan's image-to-video) or on all
# the call's images (FLUX.2's and Qwen-Image-Edit-2509's reference images): their prompts run one
# a call, each with its own
ONE_IMAGE_A_CALL = ("WanImageToVideo", "Flux2", "QwenImageEditPlus")
# pipelines whose one prompt may carry several reference images (a list in the image column)
MULTI_REFERENCE = ("Flux2", "QwenImageEditPlus")


def controlnets(pipe) -> int:
    """How many ControlNets a call runs beside the denoiser: none, one, or a multi-ControlNet's."""
    controlnet = getattr(pipe, "controlnet", None)
    return 0 if controlnet is None else len(getattr(controlnet, "nets", None) or [controlnet])


def image_parameter(parameters: Mapping) -> str | None:
    """The call argument (of a call's `parameters`) that takes a prompt's image: `image`
    (editing, image-to-video, inpainting, SD's ControlNet), else `control_image` (FLUX Control:
    Canny, Depth); None for a call that takes no image."""
    return next((name for name in ("image", "control_image") if name in parameters), None)


def call_inputs(prompts: list[str], pipe) -> dict:
    """A call's prompts, by name (FLUX Kontext's call takes its image first), and where they
    carry them, their images (an editing, image-to-video or control pipeline's inputs) and masks
    (an inpainting one's): one alone, as every pipeline takes it, a list for several prompts."""
    inputs = {"prompt": list(prompts)}
    for name, values in ((image_parameter(call_parameters(pipe)) or "image", conditioning_images(prompts)),
                         ("mask_image", conditioning_masks(prompts))):
        if values is not None:
            inputs[name] = values[0] if len(values) == 1 else values
    return inputs


def check_conditioning(pipe, prompts: list[str], batch_size: int = 1) -> None:
    """Prompts and pipeline agree on images: an image-to-video pipeline needs one with every
    prompt, an inpainting one an image and a mask, and a text-to-image one would ignore them; one
    that takes one image a call runs one prompt a call (a PromptError, one line, otherwise)."""
    parameters = call_parameters(pipe)
    key = image_parameter(parameters)
    parameter = parameters.get(key) if key else None
    name = type(pipe).__name__
    images = conditioning_images(prompts)
    masks = conditioning_masks(prompts)
    if "mask_image" in parameters and masks is None:
        raise PromptError(f"{name} fills a masked region of each prompt's image: set "
                          "prompts.image_column and prompts.mask_column (columns of a prompt file "
                          "that hold image and mask paths) or name a folder whose metadata.jsonl "
                          "gives file_name and mask_file_name")
    if masks is not None and "mask_image" not in parameters:
        raise PromptError(f"{name} takes no mask: the prompts' masks would be ignored; use an "
                          "inpainting pipeline (FLUX Fill, Stable Diffusion inpainting), or "
                          "prompts without masks")
    if "image" in parameters and "control_image" in parameters:
        raise PromptError(f"{name} takes an image and a control image with each prompt "
                          "(ControlNet or Control image-to-image, inpainting): not covered, a "
                          "prompt carries one image; use its text-to-image ControlNet pipeline")
    nets = controlnets(pipe)
    several = next((prompt for prompt in prompts if len(reference_images(prompt)) > 1), None)
    if nets > 1 and images is not None:
        _check_control_images(name, nets, prompts, batch_size)
    elif several is not None and not _derives_from(pipe, MULTI_REFERENCE):
        instead = ("name one ControlNet for each (model.controlnet = [...])" if nets else
                   "use a multi-reference pipeline (FLUX.2, Qwen-Image-Edit-2509)")
        raise PromptError(f"{name} takes one image with each prompt, and {str(several)[:60]!r} "
                          f"carries {len(reference_images(several))}: give each prompt one image, or "
                          f"{instead}")
    single = _derives_from(pipe, ONE_IMAGE_A_CALL)
    if single and batch_size > 1 and images is not None:
        raise PromptError(f"{name} conditions every prompt of a call on the call's images: set "
                          "prompts.batch_size = 1 (each prompt with its own image)")
    if images is None:
        if parameter is not None and (parameter.default is parameter.empty or key == "control_image"
                                      or "strength" in parameters):  # image-to-image
            raise PromptError(f"{name} takes an image with each prompt: set prompts.image_column "
                              "(the column of a prompt file that holds image paths) or name a "
                              "folder of images with a metadata.jsonl as prompts.source")
    elif parameter is None:
        raise PromptError(f"{name} takes no image: the prompts' images (prompts.image_column, or "
                          "a folder as prompts.source) would be ignored; use text prompts, or an "
                          "image-conditioned pipeline (FLUX Kontext, image-to-video)")


def _check_control_images(name: str, nets: int, prompts: list[str], batch_size: int) -> None:
    """Several ControlNets: each prompt carries one control image for each, in their order, and
    runs alone (diffusers' pipelines nest a batch's control images differently: SD's per prompt,
    FLUX's per ControlNet, and SDXL's preparation disagrees with its own check)."""
    wrong = next((prompt for prompt in prompts if len(reference_images(prompt)) != nets), None)
    if wrong is not None:
        raise PromptError(f"{name} runs {nets} ControlNets, each on its own control image, and "
                          f"{str(wrong)[:60]!r} carries {len(reference_images(wrong))}: give each "
                          f"prompt {nets} images (a list in prompts.image_column, in the "
                          "ControlNets' order)")
    if batch_size > 1:
        raise PromptError(f"{name} runs {nets} ControlNets, which take one prompt a call: set "
                          "prompts.batch_size = 1")


def _derives_from(pipe, families: tuple[str, ...]) -> bool:
    """Whether `pipe`'s class, or one it derives from, is one of `families` (class name prefixes)."""
    return any(cls.__name__.startswith(families) for cls in type(pipe).__mro__)


MIN_WARMUP_STEPS = 3  # multistep schedulers (PNDM, DPM-Solver) use their own first-step paths


def n_batches(num_samples: int, batch_size: int) -> int:
    return math.ceil(num_samples / batch_size)


@dataclass
class Batch:
    """One generated batch: which prompts, their 8-bit images (N x H x W x 3) or videos
    (N x frames x H x W x 3), and the timed inference seconds."""

    indices: range
    images: np.ndarray
    seconds: float

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / len(self.indices)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def guidance_for(pipe, guidance_scale: float) -> float | None:
    """The guidance_scale to pass: None where the pipeline's own default is None and its
    transformer is not guidance-distilled (Qwen-Image: its guidance is true_cfg_scale, and any
    guidance_scale draws a warning on every call), else the spec's."""
    parameter = call_parameters(pipe).get("guidance_scale")
    transformer = getattr(pipe, "transformer", None)
    distilled = getattr(getattr(transformer, "config", None), "guidance_embeds", True)
    if parameter is not None and parameter.default is None and distilled is False:
        return None
    return guidance_scale


def warmup_steps(config: GenerationConfig, setting: AppliedSetting | None) -> int:
    """The short warm-up: the first batch's shape for just enough steps to pass through every code
    path (the scheduler's first multistep updates, each accelerator's cached and uncached steps)."""
    needed = max(MIN_WARMUP_STEPS, setting.warmup_steps if setting is not None else 0)
    return config.steps_denoising(needed)


# A compiled pipeline warms up until a call compiles nothing new (at most this many calls): a
# cache that keeps Python state guarded by dynamo recompiles over its first calls (diffusers'
# SeaCache guards its history's length: 7 graphs in the first call on tiny-wan, 1 in the second,
# none after), and a server times none of them
COMPILED_WARMUP_CALLS = 3


def generate(pipe, prompts: list[str], config: GenerationConfig,
             setting: AppliedSetting | None = None, warmup: bool | int = True,
             progress: bool = False, description: str = "batches",
             fault: Callable[[int], None] | None = None,
             on_warmup: Callable[[float], None] | None = None) -> Iterator[Batch]:
    """Yield batches of images for `prompts`, timing each pipeline call.

    `setting` (an applied accelerator setting) generates in place of the plain pipeline.
    `warmup`: True runs the short untimed warm-up (`warmup_steps`), an int that many steps,
    False none. `fault(batch_index)` is a test hook called inside each timed batch (it may raise,
    or take time).
    `on_warmup(seconds)` receives the duration of the untimed warm-up call.
    """
    call = setting if setting is not None else pipe
    device = execution_device(pipe)
    guidance_scale = guidance_for(pipe, config.guidance_scale)

    def run(indices: range, steps: int = config.steps,
            index: int | None = None) -> tuple[np.ndarray, float]:
        if setting is not None:
            setting.reseed(config.seed)
        generators = [torch.Generator("cpu").manual_seed(prompt_seed(config.seed, i))
                      for i in indices]
        _synchronize(device)
        start = time.perf_counter()
        if fault is not None and index is not None:
            fault(index)
        with quiet_truncation(pipe):  # a long prompt's cut is said once (evaluator_from_spec)
            output = call(
                **call_inputs([prompts[i] for i in indices], pipe),
                num_inference_steps=steps,
                height=config.height,
                width=config.width,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="np",
                **config.extra_kwargs(len(indices), pipe),
            )
        _synchronize(device)
        seconds = time.perf_counter() - start
        # video pipelines return `frames` (N x F x H x W x 3 in [0, 1] with output_type="np")
        return (output.frames if hasattr(output, "frames") else output.images), seconds

    batches = [range(start, min(start + config.batch_size, len(prompts)))
               for start in range(0, len(prompts), config.batch_size)]
    if warmup is not False:
        steps = warmup_steps(config, setting) if warmup is True else int(warmup)
        seconds = 0.0
        for _ in range(COMPILED_WARMUP_CALLS if compiled_as(pipe) else 1):
            graphs = graphs_compiled()
            seconds += run(batches[0], steps)[1]
            if graphs_compiled() == graphs:  # steady: the timed calls compile nothing new
                break
        if on_warmup is not None:
            on_warmup(seconds)
    for index, indices in enumerate(tqdm(batches, desc=description, disable=not progress,
                                         leave=False, unit="batch")):
        images, seconds = run(indices, index=index)
        yield Batch(indices, (images * 255).round().clip(0, 255).astype(np.uint8), seconds)
