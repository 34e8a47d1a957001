"""Builtin Z-Image (Tongyi-MAI's single-stream DiT; Z-Image-Turbo is its 8-step distilled model):
the real diffusers pipeline with a tiny random-weight transformer, VAE and Qwen3 text encoder
built in code (no model hub), for tests.

Z-Image's transformer takes none of diffusers' cache hooks (no `enable_cache`; it also gets the
timestep as (1000 - t) / 1000, which PAB's window, read from the calls, would never match);
cache-dit's DBCache knows it by its pipeline's class name. So fewer steps and DBCache are what a
search of it can try.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from optsearch.measure.builtin_dits import qwen_tokenizer
from optsearch.measure.builtin_flux2 import USER_TEXT_ONLY


class ZImageShortPromptPipeline(ZImagePipeline):
    """Z-Image whose prompts default to 32 tokens (the real ones pad to 512) and images to 128 px
    (the real call's 1024 px default would be 4096 tokens for a tiny model). Named so that
    cache-dit knows it as Z-Image."""

    def __call__(self, prompt=None, height: int | None = None, width: int | None = None, *args,
                 max_sequence_length: int = 32, **kwargs):
        return super().__call__(prompt, height or 128, width or 128, *args,
                                max_sequence_length=max_sequence_length, **kwargs)


def build_tiny_z_image() -> ZImagePipeline:
    """Z-Image's topology, tiny: 6 single-stream layers of 4 heads of 32 (the real one: 30 of 30
    heads of 128) after one refiner layer each for the image and the text, a 16-channel VAE
    (8x, as FLUX's), a 3-layer Qwen3 text encoder read at its second-to-last layer, 128 px by
    default. Z-Image-Turbo's scheduler (shift 3)."""
    tokenizer = qwen_tokenizer()
    tokenizer.chat_template = USER_TEXT_ONLY  # Qwen's chat markers would fill the 32 tokens
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), bos_token_id=0,
        eos_token_id=2, pad_token_id=0))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=128, n_layers=6,
        n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=32, axes_dims=[8, 12, 12],
        axes_lens=[64, 32, 32])
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 16, 16), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16, layers_per_block=1, norm_num_groups=16, sample_size=128,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    pipe = ZImageShortPromptPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                     text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    return pipe
