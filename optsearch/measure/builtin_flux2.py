"""Builtin FLUX.2 [dev]: the real diffusers pipeline class (Flux2Pipeline) with a tiny random-weight
transformer, VAE and Mistral 3 text encoder built in code (no model hub), for tests.

FLUX.2's transformer is FLUX.1's topology grown up: double-stream blocks, then single-stream
ones, now with one modulation shared by all blocks of a kind and a SwiGLU feed-forward. Its
[dev] pipeline is guidance-distilled (one transformer call a step), passes the timestep
divided by 1000 and names no cache context, as FLUX.1 Kontext's and Fill's loops do. Its text
embedding stacks three hidden layers of the text encoder (10, 20 and 30 of Mistral Small 3.1's
40). Its images mean nothing; what the caches skip, and how the search treats it, is real.
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from transformers import Mistral3Config, Mistral3ForConditionalGeneration

from optsearch.measure.builtin_dits import qwen_tokenizer

# the tiny tokenizer's chat template keeps the user's text: FLUX.2's system message (about 200
# characters, one token each here) would fill the tiny prompts' 32 tokens before the prompt
USER_TEXT_ONLY = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                  "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
                  "{% endif %}{% endfor %}")


class Flux2ShortPromptPipeline(Flux2Pipeline):
    """FLUX.2 [dev] with 32-token prompts read from the tiny text encoder's three layers (the real
    one pads to 512 tokens, eight times the 64 image tokens at 128 px, and reads layers 10, 20
    and 30). Named so that cache-dit knows it as FLUX."""

    def __call__(self, image=None, prompt=None, *args, max_sequence_length: int = 32,
                 text_encoder_out_layers: tuple[int, ...] = (1, 2, 3), **kwargs):
        return super().__call__(image, prompt, *args, max_sequence_length=max_sequence_length,
                                text_encoder_out_layers=text_encoder_out_layers, **kwargs)


def build_tiny_flux2() -> Flux2Pipeline:
    """FLUX.2's topology, tiny (2 double + 4 single blocks, 4 heads of 32, as builtin:tiny-flux),
    128 px by default with a 16x VAE-and-patch like the real one (64 image tokens)."""
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=96, timestep_guidance_channels=64,
        axes_dims_rope=(8, 8, 8, 8))
    vae = AutoencoderKLFlux2(
        block_out_channels=(16, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=16,
        norm_num_groups=16, patch_size=(2, 2))
    tokenizer = qwen_tokenizer()
    tokenizer.chat_template = USER_TEXT_ONLY
    size = len(tokenizer)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config={"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "head_dim": 8, "vocab_size": size, "bos_token_id": 0, "eos_token_id": 2,
                     "pad_token_id": 0},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 16,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 8,
                       "patch_size": 4, "image_size": 32},
        image_token_index=size - 1, spatial_merge_size=2))
    pipe = Flux2ShortPromptPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer,
                                    transformer=transformer)
    pipe.default_sample_size = 16  # x 8 = 128 px when height/width are not given
    return pipe
