"""Text encoders and tokenizers built in code, for the builtin pipelines (no model hub)."""

from __future__ import annotations

import string

from open_clip.tokenizer import bytes_to_unicode
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
)


def byte_level_tokenizer(max_length: int = 77):
    """A CLIPTokenizer that needs no files: the 256 byte characters, their word-end forms, no merges."""
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def text_encoder(hidden_size: int, vocab_size: int, with_projection: bool = False):
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


def t5_tokenizer():
    """A T5-style tokenizer built with `tokenizers` (no files): a unigram over the printable ASCII
    characters with a metaspace pre-tokenizer, and T5's <pad>, </s>, <unk>."""

    characters = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\u2581"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in characters]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")
