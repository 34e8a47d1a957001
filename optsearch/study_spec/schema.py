"""The study spec's schema: one dataclass per TOML table, with its defaults.

`reading.py` turns a TOML file (or a dict stored in a study) into these; `checks.py` validates it.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

from optsearch.accelerators import (
    ANY_COMBOS,
    KINDS,
    ORDER,
    calibration_cost,
    calibration_steps,
    denoised_steps,
    params_of,
)
from optsearch.measure.model_ids import model_kind

DTYPES = ("auto", "float16", "bfloat16", "float32")
METRICS = ("clip_loss", "psnr", "ssim", "lpips")
COMPILES = ("none", "regional", "full")
RULES = ("mean", "bound")
STATISTICS = ("mean", "worst", "p10")  # over prompts: which figure the limit applies to
MODES = ("max-speedup", "target-speedup", "pareto")
SAMPLERS = ("tpe", "gp", "random", "grid")
PROMPT_SOURCES = ("coco2017", "parti", "builtin")
PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
KNOWN_SCHEDULERS = (
    "DDIM", "PNDM", "DDPM", "LMSDiscrete", "EulerDiscrete", "EulerAncestralDiscrete",
    "DPMSolverMultistep", "DPMSolverSinglestep", "DEISMultistep", "UniPCMultistep", "HeunDiscrete",
    "KDPM2Discrete", "KDPM2AncestralDiscrete", "LCM", "TCD",
)




# the call arguments optsearch sets itself, and where a spec says them instead
SET_BY_OPTSEARCH = {
    **dict.fromkeys(("prompt", "image", "mask_image", "control_image"), " (each prompt's)"),
    **dict.fromkeys(("generator", "latents", "output_type", "return_dict",
                     "num_images_per_prompt", "num_videos_per_prompt", "max_area"), ""),
    **{name: f": use model.{key}" for name, key in (
        ("num_inference_steps", "steps"), ("height", "height"), ("width", "width"),
        ("guidance_scale", "guidance_scale"), ("guidance_scale_2", "guidance_scale_2"),
        ("true_cfg_scale", "true_cfg_scale"), ("negative_prompt", "negative_prompt"),
        ("strength", "strength"), ("num_frames", "num_frames"))},
}


@dataclass
class ModelSpec:
    id: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    dtype: str = "auto"  # float16 for UNets, bfloat16 for diffusion transformers, float32 on CPU
    kind: str = "auto"  # "unet", "transformer" or "video": which families apply; auto tells from the id
    device: str = "auto"
    scheduler: str | None = None  # None keeps the model's own scheduler
    steps: int = 50
    # image-to-image: the share of the steps that denoise the prompt's image (diffusers' strength;
    # None: the call's default, text-to-image or a pipeline without one)
    strength: float | None = None
    # the hub id or folder of a ControlNet the pipeline is served with (each prompt's image is
    # its control image), or a list of them (diffusers' multi-ControlNet: each prompt carries one
    # control image for each, in order); a builtin or a factory builds its own
    controlnet: str | list[str] | None = None
    # a LoRA the pipeline is served with: a hub id, folder or .safetensors file (lora_weight_name:
    # its file in a repo or folder of several), at lora_scale; or a list of them, each at its
    # scale (a number: each at it). Kept as adapters beside each layer they adapt (a server that
    # switches LoRAs) or fused into the weights (no work added per step)
    lora: str | list[str] | None = None
    lora_weight_name: str | None = None
    lora_scale: float | list[float] = 1.0
    fuse_lora: bool = False
    height: int | None = None  # None: the model's native size
    width: int | None = None
    num_frames: int | None = None  # video pipelines: frames per video (None: the pipeline's default)
    fps: int = 16  # video pipelines: the frame rate of the animated artifacts
    guidance_scale: float = 7.5
    guidance_scale_2: float | None = None  # Wan 2.2 A14B's guidance on its low-noise expert
    true_cfg_scale: float | None = None  # Qwen-Image's classifier-free guidance (needs a negative)
    negative_prompt: str | None = None  # sent with every prompt when set
    compile: str = "none"  # torch.compile the denoiser as served: "none", "regional" or "full"
    compile_mode: str | None = None  # torch.compile's mode, e.g. "max-autotune-no-cudagraphs"
    compile_backend: str = "inductor"  # "eager" traces only (graph breaks counted, no codegen)
    factory_path: str | None = None  # where a module:function factory is imported from: the
    # spec's folder unless given (then the working directory and PYTHONPATH)
    # [model.call]: other keyword arguments every call takes, as served (max_sequence_length,
    # controlnet_conditioning_scale, guidance_rescale, ...): deployment context
    call: dict[str, Any] = field(default_factory=dict)

    @property
    def denoising_steps(self) -> int:
        """The steps that run the denoiser: `steps`, or at a `strength` its share of them (what
        step-counted parameters count)."""
        return denoised_steps(self.steps, self.strength, self.rounds_up)

    @property
    def pipeline_kind(self) -> str:
        """The model's kind: as the spec says, else told from its id (unknown, as a factory's: a
        UNet). What `search.model_kind` is set to when the spec is loaded."""
        if self.kind in KINDS:
            return self.kind
        return model_kind(self.id) or "unet"

    @property
    def rounds_up(self) -> bool:
        """At a strength, an image transformer's image-to-image pipeline (FLUX, SD3, Qwen-Image)
        rounds the steps that denoise up, Stable Diffusion's down (`denoised_steps`); a factory's
        counts as SD's here."""
        return self.strength is not None and self.pipeline_kind == "transformer"

    @property
    def controlnets(self) -> list[str]:
        """The ControlNets served, as a list (`controlnet` is one, a list, or none)."""
        return listed(self.controlnet)

    @property
    def lora_sources(self) -> list[str]:
        """The LoRAs served, as a list (`lora` is one, a list, or none)."""
        return listed(self.lora)

    @property
    def loras(self) -> list[tuple[str, float]]:
        """Each LoRA served, with its scale (a number in lora_scale is each one's)."""
        sources = self.lora_sources
        scales = self.lora_scale if isinstance(self.lora_scale, list) else [self.lora_scale] * len(sources)
        return list(zip(sources, scales, strict=False))


def listed(value: str | list[str] | None) -> list[str]:
    """A key that takes one name or a list of them, as a list."""
    return [value] if isinstance(value, str) else list(value or [])


@dataclass
class PromptSpec:
    source: str = "coco2017"
    num_samples: int = 32
    batch_size: int = 4
    seed: int = 42
    shuffle: bool = False
    column: str | None = None  # the text column of a file or dataset, when not guessed
    # the column of a file or folder holding each prompt's image, for image-conditioned pipelines
    # (editing, image-to-video); a folder's images are its "image" column by default
    image_column: str | None = None
    # inpainting (FLUX Fill, SD inpainting): the column of each image's mask (white: the region to
    # fill); a folder's masks are its metadata's mask_file_name
    mask_column: str | None = None


@dataclass
class QualitySpec:
    clip_model: str = "ViT-g-14"
    clip_pretrained: str = "laion2b_s34b_b88k"
    metric: str = "clip_loss"
    limit: float = 0.3
    confidence: float = 0.95
    rule: str = "mean"  # feasible when the mean meets the limit, or ("bound") its unsafe-side bound
    statistic: str = "mean"  # the mean over prompts; "worst": every prompt; "p10": nine in ten
    lpips: bool = False  # also measure LPIPS (always when metric = "lpips"; needs AlexNet's weights)

    @property
    def measures_lpips(self) -> bool:
        return self.lpips or self.metric == "lpips"


@dataclass
class ObjectiveSpec:
    mode: str = "max-speedup"
    target_speedup: float | None = None
    max_memory_gib: float | None = None  # a setting whose peak memory is above it is infeasible


@dataclass
class SearchSpec:
    accelerators: list[str] | str = field(default_factory=lambda: ["deepcache"])
    sampler: str = "tpe"
    n_trials: int = 60
    early_stop: bool = True
    min_batches: int = 1  # batches evaluated before early stop may decide (speedup looks: >= 2)
    stop_margin: float = 0.05  # "dominated" only when slower than the best by more than this share
    seed: int | None = None  # sampler seed
    n_startup_trials: int = 20  # tuned on the recorded landscape (benchmarks/RESULTS.md)
    retime_baseline_every: int = 0  # re-time the worker's baseline every N trials; 0: once per worker
    probe_every: int = 3  # time one baseline batch every N trials (pass noise); 0: never
    pass_noise: float = 0.05  # one pass's speed spread assumed (5 %): a prior worth 4 probes' df
    warm_start: list[str] = field(default_factory=lambda: ["published"])  # enqueued first

    model_kind = "unet"  # set from [model] when the spec is loaded (not a spec key)

    @property
    def combos(self) -> list[tuple[str, ...]]:
        """The combos searched: the one given, several (a list of lists), or for 'any' those of
        the model's kind (accelerators.ANY_COMBOS)."""
        if self.accelerators == "any":
            return list(ANY_COMBOS[self.model_kind])
        if self.accelerators and all(isinstance(c, list) for c in self.accelerators):
            return [tuple(name for name in ORDER if name in combo) for combo in self.accelerators]
        return [tuple(name for name in ORDER if name in self.accelerators)]


@dataclass
class ArtifactSpec:
    path: str = "artifacts"  # a local folder, or s3://bucket/prefix
    grid_prompts: int = 4  # prompts shown in each trial's image grid; 0 disables grids


@dataclass
class ConfirmSpec:
    """Prompts for `study confirm`: by default the next num_samples prompts of the search's source."""

    source: str | None = None
    num_samples: int | None = None
    seed: int | None = None


@dataclass
class StudySpec:
    name: str = "optsearch"
    model: ModelSpec = field(default_factory=ModelSpec)
    prompts: PromptSpec = field(default_factory=PromptSpec)
    quality: QualitySpec = field(default_factory=QualitySpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    artifacts: ArtifactSpec = field(default_factory=ArtifactSpec)
    confirm: ConfirmSpec = field(default_factory=ConfirmSpec)
    # accelerator -> param -> [low, high] or [low, high, step] or a fixed value
    space: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def accelerators_used(self) -> list[str]:
        return [name for name in ORDER if any(name in combo for combo in self.search.combos)]

    def param_range(self, accelerator: str, param: str, auto: dict | None = None) -> tuple:
        """(low, high, step or None) for a searched parameter, or (value,) for a fixed one (for a
        parameter with choices, the choices searched). An
        "auto" range is the one calibrated on this device (`auto`, {"family.param": [lo, hi]}),
        else the parameter's default."""
        value = self.space_value(accelerator, param)
        if value == "auto":
            value = (auto or {}).get(f"{accelerator}.{param}")
        if value is None:
            counted = self.model.steps if accelerator == "steps" else self.model.denoising_steps
            value = params_of(accelerator)[param].default_range(counted, self.search.model_kind)
        if not isinstance(value, (list, tuple)):
            return (value,)
        if len(value) == 1 or params_of(accelerator)[param].named:  # the choices searched
            return tuple(value)
        return (value[0], value[1], value[2] if len(value) == 3 else None)

    def searched_values(self, accelerator: str) -> dict[str, list]:
        """The values this spec lets each integer parameter of `accelerator` take, and the
        extremes of each float range: what a calibration must hold for every trial."""
        values = {}
        for param, declared in params_of(accelerator).items():
            if self.space_value(accelerator, param) == "auto":
                continue
            bounds = self.param_range(accelerator, param)
            if len(bounds) == 1 or declared.named:
                values[param] = list(bounds)
            elif declared.kind is int:
                values[param] = list(range(int(bounds[0]), int(bounds[1]) + 1, int(bounds[2] or 1)))
            else:
                values[param] = [bounds[0], bounds[1]]
        return values

    def calibration_steps(self, family: str) -> list[int]:
        """The step counts a family's "auto" range is calibrated at: the model's, and the fewest
        steps searched when a combo runs the family with `steps` (its differences grow with the
        step size: a range measured at 28 steps skips nothing at 10)."""
        fewest = None
        if any(family in combo and "steps" in combo for combo in self.search.combos):
            fewest = int(self.param_range("steps", "num_inference_steps")[0])
        return calibration_steps(family, self.model.steps, fewest)

    def distilled_for(self, family: str) -> dict | None:
        """The step-distilled LoRA setting (the first it searches) every combo that searches
        `family` runs with: its "auto" range is then calibrated on the distilled model, as its
        trials run. None where a combo runs the family without it (calibrated plain)."""
        combos = [combo for combo in self.search.combos if family in combo]
        if family == "distill" or not combos or not all("distill" in combo for combo in combos):
            return None
        return next(iter(self.distill_settings()), None)

    def distill_settings(self) -> list[dict]:
        """Each step-distilled LoRA the study searches (every file a list of `lora` or
        `weight_name` names), with the first of what else it searches (none without distill)."""
        if "distill" not in self.accelerators_used:
            return []
        searched = {param: self.param_range("distill", param) for param in params_of("distill")}
        names = ("lora", "weight_name", "lora_2", "weight_name_2")
        files = [dict(zip(names, chosen, strict=True))
                 for chosen in itertools.product(*(searched[name] for name in names))]
        first = {param: bounds[0] for param, bounds in searched.items()}
        return [{"distill": {**first, **chosen}} for chosen in files]

    def calibration_calls(self, families=None) -> float:
        """The plain calls (in calls at the model's steps) that calibrate the "auto" ranges of
        `families` (default: every family with one): what the estimate adds before the first
        trial."""
        families = {family for family, _ in self.auto_params()} if families is None else families
        return sum(calibration_cost(family, self.searched_values(family),
                                    self.calibration_steps(family)) for family in families)

    def auto_params(self) -> list[tuple[str, str]]:
        """(family, parameter) of every range the spec leaves to calibration ("auto")."""
        return [(family, param) for family in self.accelerators_used for param in params_of(family)
                if self.space_value(family, param) == "auto"]

    def space_value(self, accelerator: str, param: str):
        """What the spec gives a parameter: its `[space]` entry; where it gives none, "auto" for
        a threshold (a range measured on the model and device: a fixed default range skipped
        nothing on some models and everything on others), but with the grid sampler, whose grid
        is fixed at creation; else None (the parameter's default range)."""
        value = self.space.get(accelerator, {}).get(param)
        if value is None and params_of(accelerator)[param].calibrated \
                and self.search.sampler != "grid":
            return "auto"
        return value

    def searched_params(self, accelerator: str) -> list[str]:
        """The parameters of `accelerator` that this spec searches (ranges, not fixed values)."""
        return [p for p in params_of(accelerator) if len(self.param_range(accelerator, p)) > 1]

    def space_size(self) -> int | None:
        """How many settings the sampler can draw, at most (parameters a drawn value makes
        inactive, and twins, make fewer); None when a searched parameter is continuous or "auto"."""
        total = 0
        for combo in self.search.combos:
            size = 1
            for accelerator in combo:
                for param, declared in params_of(accelerator).items():
                    bounds = () if self.space_value(accelerator, param) == "auto" \
                        else self.param_range(accelerator, param)
                    if len(bounds) == 1:
                        continue
                    if not bounds or (declared.kind is float and bounds[2] is None
                                      and self.search.sampler != "grid"):
                        return None
                    size *= len(self.grid_values(accelerator, param)) if declared.named \
                        or self.search.sampler == "grid" \
                        else int(round((bounds[1] - bounds[0]) / (bounds[2] or 1) + 1e-9)) + 1
            total += size
        return total

    def trials_possible(self) -> int:
        """The trials a search can measure: n_trials, or the space's size where that is smaller
        (what an estimate counts)."""
        return min(self.search.n_trials, self.space_size() or self.search.n_trials)

    def grid_values(self, accelerator: str, param: str) -> list:
        """Every value the exhaustive grid tries for a parameter (step: given, else its default)."""
        bounds = self.param_range(accelerator, param)
        if len(bounds) == 1 or params_of(accelerator)[param].named:
            return list(bounds)
        low, high, step = bounds
        step = step or params_of(accelerator)[param].grid_step
        count = int(round((high - low) / step + 1e-9)) + 1
        values = [low + i * step for i in range(count)]
        if params_of(accelerator)[param].kind is int:
            return [int(v) for v in values]
        return [round(v, 10) for v in values]


SECTIONS = {
    "model": ModelSpec,
    "prompts": PromptSpec,
    "quality": QualitySpec,
    "objective": ObjectiveSpec,
    "search": SearchSpec,
    "artifacts": ArtifactSpec,
    "confirm": ConfirmSpec,
}
