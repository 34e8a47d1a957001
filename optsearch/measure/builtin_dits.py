"""Builtin Stable Diffusion 3, Qwen-Image and Wan (video): the real diffusers pipeline classes with
tiny random weights and tokenizers built in code (no model hub), for tests and the demo.

All run cache-dit's DBCache (cache-dit knows them by class name); Qwen-Image's and Wan's
transformers also take diffusers' cache hooks, SD3's does not. Their images mean nothing; what the
caches skip, and how the search treats it, is real.
"""

from __future__ import annotations

import string
import sys

from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from optsearch.measure.builtin_text import byte_level_tokenizer, t5_tokenizer, text_encoder


class StableDiffusion3ShortPromptPipeline(StableDiffusion3Pipeline):
    """SD3 whose T5 prompts default to 32 tokens (the tiny T5 needs no more; 256 would cost more
    than the 256 image tokens at 128 px). Named so that cache-dit knows it as SD3."""

    def __call__(self, prompt=None, *args, max_sequence_length: int = 32, **kwargs):
        return super().__call__(prompt, *args, max_sequence_length=max_sequence_length, **kwargs)


def build_tiny_sd3() -> StableDiffusion3Pipeline:
    """SD3's MMDiT, tiny: 4 joint blocks of 4 heads of 32, two CLIP encoders and a T5."""
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=16, out_channels=16, num_layers=4,
        attention_head_dim=32, num_attention_heads=4, caption_projection_dim=128,
        joint_attention_dim=64, pooled_projection_dim=64)
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 16, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16, layers_per_block=1, norm_num_groups=16, sample_size=128,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    tokenizer, tokenizer_3 = byte_level_tokenizer(), t5_tokenizer()
    pipe = StableDiffusion3ShortPromptPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_encoder(32, len(tokenizer), with_projection=True), tokenizer=tokenizer,
        text_encoder_2=text_encoder(32, len(tokenizer), with_projection=True),
        tokenizer_2=byte_level_tokenizer(),
        text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=64, d_ff=128,
                                               num_layers=2, num_heads=4, d_kv=16)),
        tokenizer_3=tokenizer_3)
    pipe.default_sample_size = 16  # x 8 = 128 px when height/width are not given
    return pipe


QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def qwen_tokenizer(vision: bool = False) -> PreTrainedTokenizerFast:
    """Qwen's chat markers as special tokens over one token per printable character; with
    `vision`, also the markers Qwen2.5-VL's processor puts an image's tokens between."""
    characters = [c for c in string.printable if c not in "\t\r\x0b\x0c"] + ["\u2581"]
    vocab = [("<|endoftext|>", 0.0), ("<|im_start|>", 0.0), ("<|im_end|>", 0.0), ("<unk>", 0.0)]
    markers = list(QWEN_VISION_TOKENS) if vision else []
    tokenizer = Tokenizer(models.Unigram(vocab + [(c, -1.0) for c in characters]
                                         + [(marker, 0.0) for marker in markers], unk_id=3))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", unk_token="<unk>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>", *markers])


def _qwen_text_encoder(tokenizer, vision: bool = False) -> Qwen2_5_VLForConditionalGeneration:
    """A 2-layer Qwen2.5-VL over `tokenizer`, with a 1-block vision tower (Qwen-Image-Edit's
    text encoder also reads the image to edit)."""
    size = len(tokenizer)
    # text only: ids past the prompts' characters; with vision, the tokenizer's own markers
    start, end, image, video = (tokenizer.convert_tokens_to_ids(list(QWEN_VISION_TOKENS)) if vision
                                else (size - 2, size - 1, size - 4, size - 5))
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": size,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default",
                                      "type": "default"}, "rope_theta": 1000000.0,
                     "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": 32},
        vocab_size=size, bos_token_id=0, eos_token_id=2, pad_token_id=0,
        vision_start_token_id=start, vision_end_token_id=end,
        vision_token_id=image if vision else size - 3, image_token_id=image, video_token_id=video))


def _qwen_image_components() -> dict:
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=4, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=32, guidance_embeds=False,
            axes_dims_rope=(8, 12, 12)),
        vae=AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                   temperal_downsample=[False, True, True],
                                   latents_mean=[0.0] * 16, latents_std=[1.0] * 16))


def build_tiny_qwen_image() -> QwenImagePipeline:
    """Qwen-Image's MMDiT, tiny: 4 blocks of 4 heads of 32, a 2-layer Qwen2.5-VL text encoder."""
    tokenizer = qwen_tokenizer()
    components = _qwen_image_components()  # built first: the seeded weights stay as they were
    pipe = QwenImagePipeline(**components, text_encoder=_qwen_text_encoder(tokenizer),
                             tokenizer=tokenizer)
    pipe.default_sample_size = 16  # x 8 = 128 px when height/width are not given
    return pipe


class QwenImageEditSmallInputPipeline(QwenImageEditPipeline):
    """Qwen-Image-Edit with the image to edit encoded at 128 x 128 px of area: the real one
    resizes it to about 1 MP (its module's `calculate_dimensions(1024 * 1024, ...)`, read at
    every call), far too many tokens for a tiny model, so that function is given the small area
    for the call. Named so that cache-dit knows it as Qwen-Image-Edit."""

    input_area = 128 * 128

    def __call__(self, image=None, prompt=None, *args, **kwargs):
        module = sys.modules[QwenImageEditPipeline.__module__]
        real = module.calculate_dimensions
        module.calculate_dimensions = lambda _area, ratio: real(self.input_area, ratio)
        try:
            return super().__call__(image, prompt, *args, **kwargs)
        finally:
            module.calculate_dimensions = real


def _qwen_edit_parts() -> dict:
    """Tiny Qwen-Image's components with what its edit pipelines add: a text encoder with a
    1-block vision tower, and a processor that keeps each image at 56 x 56 px (4 tokens)."""
    tokenizer = qwen_tokenizer(vision=True)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())
    return dict(**_qwen_image_components(), tokenizer=tokenizer, processor=processor,
                text_encoder=_qwen_text_encoder(tokenizer, vision=True))


def _drop_system_prompt(pipe, user_text_starts: str):
    """Drop the system prompt's tokens from the embeddings, as the real pipeline drops its 64:
    those of the template before `user_text_starts`. 128 px by default."""
    template = pipe.prompt_template_encode
    pipe.prompt_template_encode_start_idx = len(
        pipe.tokenizer(template[:template.index(user_text_starts)]).input_ids)
    pipe.default_sample_size = 16
    return pipe


def build_tiny_qwen_image_edit() -> QwenImageEditPipeline:
    """Qwen-Image-Edit on tiny Qwen-Image's MMDiT: the image to edit is encoded by the VAE (its
    tokens join the generated image's in every block) and read by the text encoder's vision
    tower."""
    return _drop_system_prompt(QwenImageEditSmallInputPipeline(**_qwen_edit_parts()), "<|vision_start|>")


class QwenImageEditPlusSmallInputPipeline(QwenImageEditPlusPipeline):
    """Qwen-Image-Edit-2509 (several reference images a prompt) with each reference encoded at a
    tiny model's sizes: the real one sizes them for the VAE at about 1 MP and for the vision
    tower at 384 x 384 px of area (its module's `calculate_dimensions`, read at every call).
    Named so that cache-dit knows it as Qwen-Image-Edit."""

    areas = {1024 * 1024: 64 * 64, 384 * 384: 56 * 56}  # the real call's areas -> the tiny ones

    def __call__(self, image=None, prompt=None, *args, **kwargs):
        module = sys.modules[QwenImageEditPlusPipeline.__module__]
        real = module.calculate_dimensions
        module.calculate_dimensions = lambda area, ratio: real(self.areas.get(area, area), ratio)
        try:
            return super().__call__(image, prompt, *args, **kwargs)
        finally:
            module.calculate_dimensions = real


def build_tiny_qwen_image_edit_plus() -> QwenImageEditPlusPipeline:
    """Qwen-Image-Edit-2509 on tiny Qwen-Image's MMDiT: each reference image is encoded by the VAE
    (its tokens join the generated image's) and read by the text encoder's vision tower."""
    return _drop_system_prompt(QwenImageEditPlusSmallInputPipeline(**_qwen_edit_parts()), "{}")


class WanShortPromptPipeline(WanPipeline):
    """Wan whose UMT5 prompts default to 32 tokens (the tiny encoder needs no more; Wan's 512
    would cost more than the video's tokens) and 9 frames at 64 px. Named so that cache-dit knows
    it as Wan."""

    def __call__(self, prompt=None, *args, max_sequence_length: int = 32, height: int | None = 64,
                 width: int | None = 64, num_frames: int | None = 9, **kwargs):
        return super().__call__(prompt, *args, max_sequence_length=max_sequence_length,
                                height=height or 64, width=width or 64,
                                num_frames=num_frames or 9, **kwargs)


class WanImageToVideoShortPromptPipeline(WanImageToVideoPipeline):
    """Wan image-to-video with tiny Wan's defaults (32-token prompts, 9 frames of 64 px)."""

    def __call__(self, image, prompt=None, *args, max_sequence_length: int = 32,
                 height: int | None = 64, width: int | None = 64, num_frames: int | None = 9,
                 **kwargs):
        return super().__call__(image, prompt, *args, max_sequence_length=max_sequence_length,
                                height=height or 64, width=width or 64,
                                num_frames=num_frames or 9, **kwargs)


def _tiny_wan_transformer(in_channels: int = 16) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=in_channels,
        out_channels=16, text_dim=32, freq_dim=64, ffn_dim=128, num_layers=4,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def build_tiny_wan(experts: int = 1) -> WanPipeline:
    """Wan 2.1's video transformer, tiny: 4 blocks of 4 heads of 16, a 2-layer UMT5, and Wan's
    causal 3-D VAE (4x in time, 8x in space): 9 frames of 64 px, 3 latent frames of 4x4 tokens.
    `experts` 2: Wan 2.2 A14B's layout, a second transformer for the low-noise steps (below
    its boundary, 0.875 of the schedule as A14B's text-to-video sets it)."""
    tokenizer = t5_tokenizer()
    text = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64,
                                       num_layers=2, num_heads=4, d_kv=8))
    transformer = _tiny_wan_transformer()
    second = {"transformer_2": _tiny_wan_transformer(), "boundary_ratio": 0.875} if experts == 2 else {}
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    return WanShortPromptPipeline(tokenizer=tokenizer, text_encoder=text, transformer=transformer,
                                  vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                  **second)


def build_tiny_wan_i2v() -> WanImageToVideoPipeline:
    """builtin:tiny-wan-i2v: tiny Wan, image-to-video as Wan 2.2's I2V (no image encoder): the
    first frame's latents and a mask join the noise (36 input channels)."""
    text_to_video = build_tiny_wan()
    return WanImageToVideoShortPromptPipeline(
        tokenizer=text_to_video.tokenizer, text_encoder=text_to_video.text_encoder,
        vae=text_to_video.vae, scheduler=text_to_video.scheduler,
        transformer=_tiny_wan_transformer(in_channels=36))


def build_tiny_wan22() -> WanPipeline:
    """builtin:tiny-wan22: tiny Wan with Wan 2.2 A14B's two experts."""
    return build_tiny_wan(experts=2)
