"""The builtin offline pipelines: random weights and tokenizers built in code, no model hub.

Tests and the demo use them. Their topologies are chosen so that every accelerator really changes
the computation: ToMe acts only where attention sits at the top UNet level, so the tiny UNet has
attention there.
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from open_clip.tokenizer import bytes_to_unicode
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from optsearch.errors import ModelLoadError

BUILTIN_KINDS = {"builtin:tiny": "unet", "builtin:cpu-bench": "unet", "builtin:tiny-xl": "unet",
                 "builtin:sd15-random": "unet", "builtin:tiny-flux": "transformer"}
BUILTIN_MODELS = tuple(BUILTIN_KINDS)


def byte_level_tokenizer(max_length: int = 77):
    """A CLIPTokenizer that needs no files: the 256 byte characters, their word-end forms, no merges."""
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _text_encoder(hidden_size: int, vocab_size: int, with_projection: bool = False):
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
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _build_sd(unet_kwargs: dict, vae_channels: tuple[int, ...], text_hidden: int):
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
        pipe.scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", skip_prk_steps=True,
                                       steps_offset=1)
        return pipe
    raise ModelLoadError(f"unknown builtin model {name!r} (known: {', '.join(BUILTIN_MODELS)})")


def _build_tiny_xl():
    """A tiny SDXL pipeline (two text encoders, text_time conditioning), after diffusers' tests."""
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

    characters = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\u2581"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in characters]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")


def _short_prompt_flux():
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
