"""Pipeline loading: hub ids and local folders (as users do), and builtin offline models.

The builtin models have random weights and a byte-level tokenizer built in code, so tests and the
demo need no model hub. Their topologies are chosen so that every accelerator really changes the
computation (see design.md: attention must sit at the top UNet level for ToMe to act).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

BUILTIN_MODELS = ("builtin:tiny", "builtin:cpu-bench", "builtin:tiny-xl", "builtin:sd15-random")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ModelLoadError(Exception):
    """The pipeline could not be loaded (missing folder, unknown hub id, bad dtype/device)."""


@dataclass(frozen=True)
class Placement:
    """Where a pipeline runs and in which precision, after resolving 'auto' and CPU limits."""

    device: torch.device
    dtype: torch.dtype


def resolve_placement(device: str, dtype: str) -> Placement:
    """Resolve `auto` to cuda when available; force float32 on CPU (half is slow or unsupported)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available here")
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)"
            )
    torch_dtype = DTYPES[dtype]
    if torch_device.type == "cpu" and torch_dtype != torch.float32:
        warnings.warn(f"dtype {dtype} is not used on CPU: running in float32", stacklevel=2)
        torch_dtype = torch.float32
    return Placement(torch_device, torch_dtype)


def byte_level_tokenizer(max_length: int = 77):
    """A CLIPTokenizer that needs no files: the 256 byte characters, their word-end forms, no merges."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _text_encoder(hidden_size: int, vocab_size: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config)


def _vae(block_out_channels: tuple[int, ...]):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=block_out_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=min(block_out_channels),
        sample_size=32,
    )


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _build_sd(unet_kwargs: dict, vae_channels: tuple[int, ...], text_hidden: int):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = byte_level_tokenizer()
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**unet_kwargs),
        vae=_vae(vae_channels),
        text_encoder=_text_encoder(text_hidden, len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_builtin(name: str):
    """Build a builtin pipeline with random weights, deterministically (seeded)."""
    torch.manual_seed(0)
    if name == "builtin:tiny":
        # 32 px images, 16x16 latents; attention at the top level so ToMe acts.
        unet = dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        return _build_sd(unet, (32, 64), 32)
    if name == "builtin:cpu-bench":
        # SD1.5 topology with narrow channels (34M params); 256 px by default (32x32 latents).
        unet = dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(64, 128, 256, 256),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=128,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        return _build_sd(unet, (32, 32, 64, 64), 128)
    if name == "builtin:tiny-xl":
        return _build_tiny_xl()
    if name == "builtin:sd15-random":
        # SD 1.5's real UNet and VAE sizes (860M + 84M params), random weights: GPU timing only.
        unet = dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        pipe = _build_sd(unet, (128, 256, 512, 512), 768)
        from diffusers import PNDMScheduler

        pipe.scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", skip_prk_steps=True,
                                       steps_offset=1)
        return pipe
    raise ModelLoadError(f"unknown builtin model {name!r} (known: {', '.join(BUILTIN_MODELS)})")


def _build_tiny_xl():
    """A tiny SDXL pipeline (two text encoders, text_time conditioning), after diffusers' tests."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32 (text_encoder_2 projection)
        cross_attention_dim=64,  # 32 + 32 from the two text encoders
        norm_num_groups=32,
    )
    tokenizer = byte_level_tokenizer()
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae((32, 64)),
        text_encoder=_text_encoder(32, len(tokenizer)),
        text_encoder_2=_text_encoder(32, len(tokenizer), with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=byte_level_tokenizer(),
        scheduler=_ddim(),
        force_zeros_for_empty_prompt=True,
    )


def set_scheduler(pipe, name: str) -> None:
    """Replace the scheduler by diffusers' `<name>Scheduler`, built from the model's own config."""
    import diffusers

    class_name = name if name.endswith("Scheduler") else f"{name}Scheduler"
    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None:
        raise ModelLoadError(f"unknown scheduler {name!r}")
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)


def load_pipeline(model_id: str, device: str = "auto", dtype: str = "float16",
                  scheduler: str | None = None):
    """Load a diffusers pipeline once per process: builtin name, local folder or hub id."""
    placement = resolve_placement(device, dtype)
    if model_id.startswith("builtin:"):
        pipe = build_builtin(model_id)
    else:
        pipe = _load_pretrained(model_id, placement.dtype)
    if scheduler:
        set_scheduler(pipe, scheduler)
    pipe = pipe.to(placement.device)
    if model_id.startswith("builtin:") and placement.dtype != torch.float32:
        pipe = pipe.to(dtype=placement.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_pretrained(model_id: str, torch_dtype: torch.dtype):
    from diffusers import AutoPipelineForText2Image

    looks_local = model_id.startswith((".", "/", "~"))  # hub ids look like "org/name"
    path = os.path.expanduser(model_id)
    if looks_local and not os.path.isdir(path):
        raise ModelLoadError(f"model folder {model_id!r} does not exist")
    try:
        return AutoPipelineForText2Image.from_pretrained(
            path if os.path.isdir(path) else model_id, torch_dtype=torch_dtype, safety_checker=None
        )
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load model {model_id!r}: {first_line}") from error


def is_sdxl(pipe) -> bool:
    """True for SDXL pipelines (two text encoders), which need the SDXL variants of T-GATE."""
    return hasattr(pipe, "text_encoder_2")
