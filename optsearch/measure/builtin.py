"""The builtin offline pipelines: random weights and tokenizers built in code, no model hub.

Tests and the demo use them. Their topologies are chosen so that every accelerator really changes
the computation: ToMe acts only where attention sits at the top UNet level, so the tiny UNet has
attention there.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxControlPipeline,
    FluxFillPipeline,
    FluxImg2ImgPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    T5Config,
    T5EncoderModel,
)

from optsearch.errors import ModelLoadError
from optsearch.measure.builtin_text import byte_level_tokenizer, t5_tokenizer, text_encoder
from optsearch.measure.model_ids import BUILTIN_MODELS


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


def _build_sd(unet_kwargs: dict, vae_channels: tuple[int, ...], text_hidden: int,
              pipeline_class=StableDiffusionPipeline):
    tokenizer = byte_level_tokenizer()
    return pipeline_class(
        unet=UNet2DConditionModel(**unet_kwargs),
        vae=_vae(vae_channels),
        text_encoder=text_encoder(text_hidden, len(tokenizer)),
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
    if name in ("builtin:tiny", "builtin:tiny-sd-inpaint", "builtin:tiny-sd-img2img"):
        # 32 px images, 16x16 latents; attention at the top level so ToMe acts. Inpainting's UNet
        # also reads the mask and the masked image's latents: 4 + 1 + 4 input channels.
        # Image-to-image runs tiny's UNet from the prompt's image, noised to its strength.
        inpaint = name == "builtin:tiny-sd-inpaint"
        unet = dict(
            sample_size=16,
            in_channels=9 if inpaint else 4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        return _build_sd(unet, (32, 64), 32, StableDiffusionInpaintPipeline if inpaint else
                         StableDiffusionImg2ImgPipeline if name.endswith("img2img")
                         else StableDiffusionPipeline)
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
    if name == "builtin:tiny-flux-kontext":
        return _build_tiny_flux_kontext()
    if name == "builtin:tiny-flux-fill":
        return _build_tiny_flux_fill()
    if name == "builtin:tiny-flux-control":
        return _build_tiny_flux_control()
    if name == "builtin:tiny-sd-controlnet":
        return _tiny_sd_controlnet()
    if name == "builtin:tiny-flux-controlnet":
        return _tiny_flux_controlnet()
    if name == "builtin:tiny-flux-img2img":
        return _tiny_flux_img2img()
    if name in ("builtin:tiny-sd3", "builtin:tiny-qwen-image", "builtin:tiny-qwen-image-edit",
                "builtin:tiny-qwen-image-edit-plus", "builtin:tiny-wan", "builtin:tiny-wan22",
                "builtin:tiny-wan-i2v"):
        from optsearch.measure import builtin_dits

        return {"builtin:tiny-sd3": builtin_dits.build_tiny_sd3,
                "builtin:tiny-qwen-image": builtin_dits.build_tiny_qwen_image,
                "builtin:tiny-qwen-image-edit": builtin_dits.build_tiny_qwen_image_edit,
                "builtin:tiny-qwen-image-edit-plus": builtin_dits.build_tiny_qwen_image_edit_plus,
                "builtin:tiny-wan": builtin_dits.build_tiny_wan,
                "builtin:tiny-wan22": builtin_dits.build_tiny_wan22,
                "builtin:tiny-wan-i2v": builtin_dits.build_tiny_wan_i2v}[name]()
    if name == "builtin:tiny-z-image":
        from optsearch.measure.builtin_z_image import build_tiny_z_image

        return build_tiny_z_image()
    if name in ("builtin:tiny-flux2", "builtin:tiny-flux2-klein"):
        from optsearch.measure import builtin_flux2

        return (builtin_flux2.build_tiny_flux2() if name == "builtin:tiny-flux2"
                else builtin_flux2.build_tiny_flux2_klein())
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
        text_encoder=text_encoder(32, len(tokenizer)),
        text_encoder_2=text_encoder(32, len(tokenizer), with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=byte_level_tokenizer(),
        scheduler=_ddim(),
        force_zeros_for_empty_prompt=True,
    )


def _short_t5_prompts(prompt, kwargs: dict, max_sequence_length: int) -> None:
    """One token per character: T5's copy of the prompts is cut here rather than warned about on
    every call."""
    if kwargs.get("prompt_2") is None and prompt is not None:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        kwargs["prompt_2"] = [p[:max_sequence_length - 2] for p in prompts]


class ShortT5Prompts:
    """A FLUX pipeline whose T5 prompts default to 32 tokens: the tiny T5 needs no more, and
    FLUX's 512 text tokens would cost eight times the 64 image tokens at 128 px."""

    def __call__(self, prompt=None, *args, max_sequence_length: int = 32, **kwargs):
        _short_t5_prompts(prompt, kwargs, max_sequence_length)
        return super().__call__(prompt, *args, max_sequence_length=max_sequence_length, **kwargs)


def _short_prompt_flux():
    class ShortPromptFluxPipeline(ShortT5Prompts, FluxPipeline):
        """FLUX with 32-token T5 prompts."""

    return ShortPromptFluxPipeline


class FluxKontextShortPromptPipeline(FluxKontextPipeline):
    """FLUX Kontext with 32-token T5 prompts, and the image to edit kept at its own size: the real
    one resizes it to the nearest of its trained resolutions (about 1 MP), far too many tokens for
    a tiny model. Named so that cache-dit knows it as FLUX."""

    def __call__(self, image=None, prompt=None, *args, max_sequence_length: int = 32,
                 _auto_resize: bool = False, **kwargs):
        _short_t5_prompts(prompt, kwargs, max_sequence_length)
        return super().__call__(image, prompt, *args, max_sequence_length=max_sequence_length,
                                _auto_resize=_auto_resize, **kwargs)


def _build_tiny_flux_kontext():
    """builtin:tiny-flux-kontext: FLUX Kontext (image editing) on tiny FLUX's topology. The image
    to edit is encoded, and its tokens join the generated image's in every block."""
    flux = _build_tiny_flux()
    pipe = FluxKontextShortPromptPipeline(**{name: component for name, component
                                             in flux.components.items()
                                             if name not in ("image_encoder", "feature_extractor")})
    pipe.default_sample_size = 16
    return pipe


class FluxFillShortPromptPipeline(ShortT5Prompts, FluxFillPipeline):
    """FLUX Fill (inpainting) with 32-token T5 prompts. Named so that cache-dit knows it as FLUX."""


class FluxControlShortPromptPipeline(ShortT5Prompts, FluxControlPipeline):
    """FLUX Control (Canny, Depth) with 32-token T5 prompts. Named so that cache-dit knows it."""


def _tiny_sd_controlnet():
    """builtin:tiny-sd-controlnet: Stable Diffusion's ControlNet pipeline on the tiny UNet, with a
    ControlNet built from it (diffusers' `from_unet`, as ControlNets are trained): each prompt's
    image is its control image, and the ControlNet runs at every step beside the UNet."""
    tiny = _build_builtin("builtin:tiny")
    controlnet = ControlNetModel.from_unet(tiny.unet, conditioning_embedding_out_channels=(16, 32))
    return StableDiffusionControlNetPipeline(**tiny.components, controlnet=_trained_away(controlnet))


def _trained_away(controlnet):
    """A ControlNet whose zero-initialized layers (the convs and projections that add its
    residuals: an untrained ControlNet adds nothing) have weights, as a trained one's do."""
    with torch.no_grad():
        for parameter in controlnet.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(std=0.1)
    return controlnet


class FluxControlNetShortPromptPipeline(ShortT5Prompts, FluxControlNetPipeline):
    """FLUX's ControlNet pipeline with 32-token T5 prompts. Named so that cache-dit knows it."""


def _tiny_flux_controlnet():
    """builtin:tiny-flux-controlnet: FLUX's ControlNet pipeline on tiny FLUX, with a ControlNet of
    one double and one single block whose residuals join the transformer's blocks."""
    flux = _build_tiny_flux()
    config = flux.transformer.config
    controlnet = FluxControlNetModel(
        patch_size=1, in_channels=config.in_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.joint_attention_dim,
        pooled_projection_dim=config.pooled_projection_dim, axes_dims_rope=config.axes_dims_rope,
        guidance_embeds=config.guidance_embeds)
    pipe = FluxControlNetShortPromptPipeline(controlnet=_trained_away(controlnet), **{
        name: component for name, component in flux.components.items()
        if name not in ("image_encoder", "feature_extractor")})
    pipe.default_sample_size = 16
    return pipe


class FluxImg2ImgShortPromptPipeline(ShortT5Prompts, FluxImg2ImgPipeline):
    """FLUX image-to-image with 32-token T5 prompts. Named so that cache-dit knows it as FLUX."""


def _tiny_flux_img2img():
    """builtin:tiny-flux-img2img: tiny FLUX's own transformer, denoising from each prompt's image
    noised to the spec's strength."""
    flux = _build_tiny_flux()
    pipe = FluxImg2ImgShortPromptPipeline(**{name: component for name, component
                                             in flux.components.items()
                                             if name not in ("image_encoder", "feature_extractor")})
    pipe.default_sample_size = 16
    return pipe


def _build_tiny_flux_fill():
    """builtin:tiny-flux-fill: FLUX Fill on tiny FLUX's topology. Its transformer also reads the
    masked image's latents (64 channels, packed) and the mask (8 x 8 pixels a latent, packed: 256)."""
    return _flux_with_inputs(FluxFillShortPromptPipeline, in_channels=384)


def _build_tiny_flux_control():
    """builtin:tiny-flux-control: FLUX Control (FLUX.1 Canny/Depth [dev]) on tiny FLUX's topology:
    its transformer also reads the control image's latents (64 channels, packed)."""
    return _flux_with_inputs(FluxControlShortPromptPipeline, in_channels=128)


def _flux_with_inputs(pipeline_class, in_channels: int):
    """Tiny FLUX whose transformer reads `in_channels` (its latents' 64 and an input's) and
    predicts the latents' 64."""
    flux = _build_tiny_flux()
    config = {key: value for key, value in flux.transformer.config.items() if not key.startswith("_")}
    config.update(in_channels=in_channels, out_channels=64)
    components = {name: component for name, component in flux.components.items()
                  if name not in ("image_encoder", "feature_extractor")}
    pipe = pipeline_class(**{**components, "transformer": FluxTransformer2DModel(**config)})
    pipe.default_sample_size = 16
    return pipe


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
    tokenizer, tokenizer_2 = byte_level_tokenizer(), t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=64, d_ff=128,
                                             num_layers=2, num_heads=4, d_kv=16))
    pipe = _short_prompt_flux()(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_encoder(64, len(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    pipe.default_sample_size = 16  # 16 latent pixels x 8 = 128 px when height/width are not given
    return pipe
