"""Pipeline loading: hub ids and local folders (as users do), and builtin offline models.

The builtin models have random weights and a byte-level tokenizer built in code, so tests and the
demo need no model hub. Their topologies are chosen so that every accelerator really changes the
computation (see design.md: attention must sit at the top UNet level for ToMe to act).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass

import torch

from optsearch.errors import ModelLoadError, first_line

logger = logging.getLogger(__name__)

BUILTIN_KINDS = {"builtin:tiny": "unet", "builtin:cpu-bench": "unet", "builtin:tiny-xl": "unet",
                 "builtin:sd15-random": "unet", "builtin:tiny-flux": "transformer"}
BUILTIN_MODELS = tuple(BUILTIN_KINDS)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
AUTO_DTYPE = {"unet": "float16", "transformer": "bfloat16"}  # what each kind is served in
# Diffusion transformers by the name their hub ids carry, when no model_index.json is at hand.
TRANSFORMER_NAMES = ("flux", "sd3", "stable-diffusion-3", "qwen-image", "wan", "hunyuan", "ltx",
                     "cogview", "chroma", "sana", "pixart", "lumina", "hidream")




@dataclass(frozen=True)
class Placement:
    """Where a pipeline runs and in which precision, after resolving 'auto' and CPU limits."""

    device: torch.device
    dtype: torch.dtype


def model_kind(model_id: str) -> str | None:
    """'unet' or 'transformer' for a model id without loading it, None when it cannot be told
    (a factory): builtin names, a folder's or the hub cache's model_index.json, else the name."""
    if model_id in BUILTIN_KINDS:
        return BUILTIN_KINDS[model_id]
    if is_factory(model_id):
        return None  # module:function factory: known once built
    index = _model_index(model_id)
    if index is not None:
        return "unet" if index.get("unet") else "transformer"
    name = model_id.lower()
    return "transformer" if any(marker in name for marker in TRANSFORMER_NAMES) else "unet"


def _model_index(model_id: str) -> dict | None:
    """The pipeline's model_index.json from its folder or the local hub cache (no download)."""
    import json

    path = os.path.join(os.path.expanduser(model_id), "model_index.json")
    if not os.path.isfile(path) and model_id.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "model_index.json")
        path = cached if isinstance(cached, str) else path
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def resolve_placement(device: str, dtype: str, kind: str | None = None) -> Placement:
    """Resolve `auto` to cuda when available; force float32 on CPU (half is slow or unsupported).
    dtype `auto`: float16 for UNets, bfloat16 for diffusion transformers (as they are served)."""
    asked_for_auto = dtype == "auto"
    if asked_for_auto:
        dtype = AUTO_DTYPE[kind or "unet"]
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
        if asked_for_auto:
            return Placement(torch_device, torch.float32)
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
    """Build a builtin pipeline with random weights, deterministically (seeded), in eval mode
    (models built in code start in training mode: T5's dropout would make every call differ)."""
    torch.manual_seed(0)
    pipe = _build_builtin(name)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _build_builtin(name: str):
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
    if name == "builtin:tiny-flux":
        return _build_tiny_flux()
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


def _t5_tokenizer():
    """A T5-style tokenizer built with `tokenizers` (no files): a unigram over the printable ASCII
    characters with a metaspace pre-tokenizer, and T5's <pad>, </s>, <unk>."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\u2581"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in characters]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")


def _short_prompt_flux():
    from diffusers import FluxPipeline

    class ShortPromptFluxPipeline(FluxPipeline):
        """FLUX whose T5 prompts default to 32 tokens: the tiny T5 needs no more, and FLUX's 512
        text tokens would cost eight times the 64 image tokens at 128 px."""

        def __call__(self, prompt=None, *args, max_sequence_length: int = 32, **kwargs):
            if kwargs.get("prompt_2") is None and prompt is not None:
                # one token per character: cut T5's copy here rather than warn on every call
                prompts = [prompt] if isinstance(prompt, str) else prompt
                kwargs["prompt_2"] = [p[:max_sequence_length - 2] for p in prompts]
            return super().__call__(prompt, *args, max_sequence_length=max_sequence_length,
                                    **kwargs)

    return ShortPromptFluxPipeline


def _build_tiny_flux():
    """FLUX's topology, tiny (2 double + 4 single blocks, 4 heads of 32), 128 px by default with
    an 8x VAE like the real one (64 image tokens): well under a second per image on 2 cores."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
        axes_dims_rope=[8, 12, 12],
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 16, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16, layers_per_block=1, norm_num_groups=16, sample_size=128,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=0.3611,
    )
    tokenizer, tokenizer_2 = byte_level_tokenizer(), _t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=64, d_ff=128,
                                             num_layers=2, num_heads=4, d_kv=16))
    pipe = _short_prompt_flux()(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=_text_encoder(64, len(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.default_sample_size = 16  # 16 latent pixels x 8 = 128 px when height/width are not given
    return pipe


def set_scheduler(pipe, name: str) -> None:
    """Replace the scheduler by diffusers' `<name>Scheduler`, built from the model's own config."""
    import diffusers

    class_name = name if name.endswith("Scheduler") else f"{name}Scheduler"
    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None:
        raise ModelLoadError(f"unknown scheduler {name!r}")
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)


FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_factory(model_id: str) -> bool:
    """`module.path:function` names a factory that builds the pipeline (like `uvicorn app:app`)."""
    return not model_id.startswith("builtin:") and bool(FACTORY.match(model_id))


def build_from_factory(model_id: str, placement: Placement):
    """Import `module.path`, call `function(device=..., dtype=...)` and check it gave a pipeline.

    The module is imported from the working directory or PYTHONPATH, in every worker process, so a
    LoRA-fused or otherwise custom pipeline can be searched by many workers.
    """
    import importlib
    import sys

    module_name, _, function_name = model_id.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or the module's own failure while importing
        raise ModelLoadError(f"model.id {model_id!r}: cannot import {module_name!r} (from the "
                             f"working directory or PYTHONPATH): {first_line(error)}") from error
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ModelLoadError(f"model.id {model_id!r}: {module_name!r} has no function "
                             f"{function_name!r}")
    try:
        pipe = factory(device=placement.device, dtype=placement.dtype)
    except Exception as error:
        raise ModelLoadError(f"model.id {model_id!r}: the factory failed: "
                             f"{type(error).__name__}: {first_line(error)}") from error
    if not callable(pipe) or not (getattr(pipe, "unet", None) is not None
                                  or getattr(pipe, "transformer", None) is not None):
        raise ModelLoadError(f"model.id {model_id!r}: the factory returned "
                             f"{type(pipe).__name__}, not a diffusers pipeline with a unet or "
                             "transformer")
    return pipe


def load_pipeline(model_id: str, device: str = "auto", dtype: str = "float16",
                  scheduler: str | None = None, kind: str | None = None):
    """Load a diffusers pipeline once per process: builtin name, `module:function` factory,
    local folder or hub id. `kind` ("unet"/"transformer") when known better than from the id."""
    kind = kind or model_kind(model_id)
    placement = resolve_placement(device, dtype, kind)
    if model_id.startswith("builtin:"):
        pipe = build_builtin(model_id)
    elif is_factory(model_id):
        pipe = build_from_factory(model_id, placement)
    else:
        pipe = _load_pretrained(model_id, placement.dtype, kind)
    if scheduler:
        set_scheduler(pipe, scheduler)
    pipe = pipe.to(placement.device)
    if model_id.startswith("builtin:") and placement.dtype != torch.float32:
        pipe = pipe.to(dtype=placement.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_pretrained(model_id: str, torch_dtype: torch.dtype, kind: str | None = "unet"):
    from diffusers import AutoPipelineForText2Image

    looks_local = model_id.startswith((".", "/", "~"))  # hub ids look like "org/name"
    path = os.path.expanduser(model_id)
    if looks_local and not os.path.isdir(path):
        raise ModelLoadError(f"model folder {model_id!r} does not exist")
    # SD pipelines carry a safety checker that would black out images and cost time; others have none.
    extra = {"safety_checker": None} if kind == "unet" else {}
    source = path if os.path.isdir(path) else model_id
    try:
        if torch_dtype == torch.float16:
            # Repos that publish half-precision files (SD 1.5, SDXL) as the "fp16" variant: half
            # the download. Repos without them raise "no such modeling files": load the default.
            try:
                return AutoPipelineForText2Image.from_pretrained(
                    source, torch_dtype=torch_dtype, variant="fp16", **extra)
            except ValueError as error:
                if "variant" not in str(error):
                    raise
                logger.info("%s has no fp16 variant: loading its default files", model_id)
        return AutoPipelineForText2Image.from_pretrained(source, torch_dtype=torch_dtype, **extra)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load model {model_id!r}: {first_line(error)}") from error


def is_sdxl(pipe) -> bool:
    """True for SDXL pipelines (two text encoders), which need the SDXL variants of T-GATE."""
    return hasattr(pipe, "text_encoder_2")
