"""Prompts longer than the text encoder reads: counted once, not warned on every call.

diffusers cuts a prompt at the CLIP text encoder's 77 tokens (and at T5's `max_sequence_length`
on FLUX and SD3) and logs the cut text on every pipeline call; transformers adds that the
sequence "will result in indexing errors", which diffusers' cut prevents. With a few long prompts
(PartiPrompts has some, users' own files often do) every batch of every trial printed both,
hundreds of lines each. A search measures what the server runs, the cut prompt, so the cut is
said once, counted (`long_prompts`), and those two messages are dropped while optsearch
generates (`quiet_truncation`); outside it, a served pipeline warns as diffusers does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

TRUNCATION_MESSAGES = (
    "The following part of your input was truncated",  # diffusers' pipelines
    "Token indices sequence length is longer than the specified maximum",  # transformers
)
TOKENIZER_LOGGER = "transformers.tokenization_utils_base"


def long_prompts(pipe, prompts: list[str]) -> tuple[int, int]:
    """(how many of `prompts` are longer than the pipeline's CLIP tokenizer takes, that limit);
    (0, 0) for a pipeline without a CLIP tokenizer (Wan, Qwen-Image: their encoders take
    hundreds of tokens)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None or "CLIP" not in type(tokenizer).__name__:
        return 0, 0
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(prompts, verbose=False)["input_ids"]]
    return sum(length > limit for length in lengths), limit


def long_prompts_note(pipe, prompts: list[str]) -> str | None:
    """One line for the user when some prompts are cut, else None."""
    count, limit = long_prompts(pipe, prompts)
    if not count:
        return None
    return (f"{count} of {len(prompts)} prompts are longer than the CLIP text encoder's {limit} "
            f"tokens: the pipeline (and the CLIP score) reads their first {limit}, as when "
            f"served; diffusers' warning of the cut is not repeated on every call")


class _DropTruncation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TRUNCATION_MESSAGES)


def _emitting_loggers(pipe) -> list[logging.Logger]:
    """The loggers the cut is logged on: each diffusers module that defines the pipeline's class
    or one it inherits from (diffusers logs per module), and transformers' tokenizer module."""
    modules = {cls.__module__ for cls in type(pipe).__mro__ if cls.__module__.startswith("diffusers")}
    return [logging.getLogger(name) for name in sorted(modules)] + [logging.getLogger(TOKENIZER_LOGGER)]


@contextmanager
def quiet_truncation(pipe) -> Iterator[None]:
    """Drop the per-call truncation messages of `pipe` while inside (the rest still shows)."""
    loggers, drop = _emitting_loggers(pipe), _DropTruncation()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)
