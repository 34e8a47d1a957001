"""The study spec's schema: one dataclass per TOML table, with its defaults.

`reading.py` turns a TOML file (or a dict stored in a study) into these; `checks.py` validates it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from optsearch.accelerators import (
    ANY_COMBOS,
    KINDS,
    ORDER,
    denoised_steps,
)
from optsearch.measure.model_ids import model_kind
from optsearch.study_spec.space import SearchSpace

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
class StudySpec(SearchSpace):
    name: str = "optsearch"
    model: ModelSpec = field(default_factory=ModelSpec)
    prompts: PromptSpec = field(default_factory=PromptSpec)
    quality: QualitySpec = field(default_factory=QualitySpec)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    artifacts: ArtifactSpec = field(default_factory=ArtifactSpec)
    confirm: ConfirmSpec = field(default_factory=ConfirmSpec)
    # accelerator -> param -> [low, high] or [low, high, step] or a fixed value (SearchSpace reads it)
    space: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def accelerators_used(self) -> list[str]:
        return [name for name in ORDER if any(name in combo for combo in self.search.combos)]


SECTIONS = {
    "model": ModelSpec,
    "prompts": PromptSpec,
    "quality": QualitySpec,
    "objective": ObjectiveSpec,
    "search": SearchSpec,
    "artifacts": ArtifactSpec,
    "confirm": ConfirmSpec,
}
