"""Builtin FLUX.2 [dev] and [klein]: the real diffusers pipeline classes (Flux2Pipeline,
Flux2KleinPipeline) with a tiny random-weight transformer, VAE and text encoder (Mistral 3 for
[dev], Qwen3 for [klein]) built in code (no model hub), for tests.

FLUX.2's transformer is FLUX.1's topology grown up: double-stream blocks, then single-stream
ones, now with one modulation shared by all blocks of a kind and a SwiGLU feed-forward. Its
[dev] pipeline is guidance-distilled (one transformer call a step), passes the timestep
divided by 1000 and names no cache context, as FLUX.1 Kontext's and Fill's loops do. Its text
embedding stacks three hidden layers of the text encoder (10, 20 and 30 of Mistral Small 3.1's
40). [klein]'s pipeline (its base models, not guidance-distilled) runs true classifier-free
guidance: two transformer calls a step, named "cond" and "uncond". Their images mean nothing;
what the caches skip, and how the search treats it, is real.
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from optsearch.measure.builtin_dits import qwen_tokenizer

# the tiny tokenizer's chat template keeps the user's text ([dev] gives it as a list of parts,
# [klein] as a string): FLUX.2's system message (about 200 characters, one token each here) and
# Qwen's chat markers would fill the tiny prompts' 32 tokens before the prompt
USER_TEXT_ONLY = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                  "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                  "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
                  "{% endif %}{% endfor %}")


class ShortFlux2Prompts:
    """A FLUX.2 pipeline whose prompts default to 32 tokens, read from the tiny text encoder's
    three layers (the real ones pad to 512 tokens, eight times the 64 image tokens at 128 px, and
    read layers 10, 20 and 30 of [dev]'s encoder, 9, 18 and 27 of [klein]'s)."""

    def __call__(self, image=None, prompt=None, *args, max_sequence_length: int = 32,
                 text_encoder_out_layers: tuple[int, ...] = (1, 2, 3), **kwargs):
        return super().__call__(image, prompt, *args, max_sequence_length=max_sequence_length,
                                text_encoder_out_layers=text_encoder_out_layers, **kwargs)


class Flux2ShortPromptPipeline(ShortFlux2Prompts, Flux2Pipeline):
    """FLUX.2 [dev] with 32-token prompts. Named so that cache-dit knows it as FLUX."""


class Flux2KleinShortPromptPipeline(ShortFlux2Prompts, Flux2KleinPipeline):
    """FLUX.2 [klein] with 32-token prompts. Named so that cache-dit knows it as FLUX."""


def _tiny_flux2_parts(guidance_embeds: bool) -> dict:
    """FLUX.2's topology, tiny (2 double + 4 single blocks, 4 heads of 32, as builtin:tiny-flux),
    128 px by default with a 16x VAE-and-patch like the real one (64 image tokens), and a
    tokenizer with one token per character."""
    tokenizer = qwen_tokenizer()
    tokenizer.chat_template = USER_TEXT_ONLY
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(), tokenizer=tokenizer,
        transformer=Flux2Transformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=96, timestep_guidance_channels=64,
            axes_dims_rope=(8, 8, 8, 8), guidance_embeds=guidance_embeds),
        vae=AutoencoderKLFlux2(
            block_out_channels=(16, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=16,
            norm_num_groups=16, patch_size=(2, 2)))


def build_tiny_flux2() -> Flux2Pipeline:
    """FLUX.2 [dev], tiny: guidance-distilled (its guidance scale is an input of the transformer),
    a 3-layer Mistral 3 text encoder."""
    parts = _tiny_flux2_parts(guidance_embeds=True)
    size = len(parts["tokenizer"])
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config={"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "head_dim": 8, "vocab_size": size, "bos_token_id": 0, "eos_token_id": 2,
                     "pad_token_id": 0},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 16,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 8,
                       "patch_size": 4, "image_size": 32},
        image_token_index=size - 1, spatial_merge_size=2))
    pipe = Flux2ShortPromptPipeline(**parts, text_encoder=text_encoder)
    pipe.default_sample_size = 16  # x 8 = 128 px when height/width are not given
    return pipe


def build_tiny_flux2_klein() -> Flux2KleinPipeline:
    """FLUX.2 [klein] base, tiny: true classifier-free guidance, a 3-layer Qwen3 text encoder."""
    parts = _tiny_flux2_parts(guidance_embeds=False)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=len(parts["tokenizer"]), bos_token_id=0,
        eos_token_id=2, pad_token_id=0))
    pipe = Flux2KleinShortPromptPipeline(**parts, text_encoder=text_encoder)
    pipe.default_sample_size = 16
    return pipe
