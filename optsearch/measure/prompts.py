"""Prompt sources: COCO-2017 captions, PartiPrompts, the bundled list, or a local file.

Hub datasets and local files both go through `datasets`, so users' hub caches, offline mode and
file formats work as they expect. The first `num_samples` prompts are taken in the source's order,
or after a seeded shuffle.
"""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from optsearch.errors import PromptError, first_line
from optsearch.measure.hub import missing, offline_reason

if TYPE_CHECKING:
    from optsearch.study_spec import StudySpec

# source -> (dataset id, split, column, take the first element of a list column)
HUB_SOURCES = {
    "coco2017": ("phiyodr/coco2017", "validation", "captions", True),
    "parti": ("nateraw/parti-prompts", "train", "Prompt", False),
}
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv",
                 ".parquet": "parquet"}
TEXT_COLUMNS = ("prompt", "Prompt", "caption", "text", "captions")




def builtin_prompts() -> list[str]:
    """Our own COCO-style captions, bundled with the package (no network)."""
    text = resources.files("optsearch").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_prompts(source: str, num_samples: int, seed: int = 42, shuffle: bool = False,
                 column: str | None = None) -> list[str]:
    """Return `num_samples` prompts from `source`, deterministically."""
    prompts = _all_prompts(source, column)
    if num_samples > len(prompts):
        raise PromptError(
            f"prompts.num_samples={num_samples} but source {source!r} has only {len(prompts)} "
            "prompts: lower num_samples or use a larger source"
        )
    if shuffle:
        prompts = list(prompts)
        random.Random(seed).shuffle(prompts)
    return prompts[:num_samples]


def is_local(source: str) -> bool:
    """Prompts read without a network: the bundled set or a file."""
    return source not in HUB_SOURCES


def prompts_of(prompts, count: int | None = None, source: str | None = None) -> list[str]:
    """The prompts a spec's [prompts] table names (a `PromptSpec`): its first `count` (default its
    num_samples), from `source` instead of its own when given."""
    return load_prompts(source or prompts.source, count or prompts.num_samples, prompts.seed,
                        prompts.shuffle, prompts.column)


def _all_prompts(source: str, column: str | None) -> list[str]:
    if source == "builtin":
        return builtin_prompts()
    if source in HUB_SOURCES:
        dataset_id, split, default_column, first_of_list = HUB_SOURCES[source]
        offline = offline_reason()  # once, before any download
        try:
            dataset = _load_dataset(dataset_id, split=split)
        except PromptError:
            if not offline:
                raise
            raise PromptError(missing(
                f"prompt set {source!r} ({dataset_id})", offline,
                'use prompts.source = "builtin" or a prompt file, or load it once where the hub '
                "is reachable and copy the cache")) from None
        return _column(dataset, column or default_column, source, first_of_list)
    path = Path(source).expanduser()
    if not path.is_file():
        raise PromptError(f"prompt file {source!r} does not exist")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise PromptError(f"prompt file {source!r}: unknown format (allowed: {', '.join(FILE_BUILDERS)})")
    if path.stat().st_size == 0:
        raise PromptError(f"prompt file {source!r} is empty")
    dataset = _load_dataset(builder, data_files=str(path), split="train")
    prompts = _column(dataset, column, source, first_of_list=True)
    if not prompts:
        raise PromptError(f"prompt file {source!r} holds no prompts")
    return prompts


def _load_dataset(*args, **kwargs):
    import datasets  # seconds to import: only when prompts are read through it

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as error:  # datasets raises many types; the first line says what went wrong
        raise PromptError(f"cannot load prompts from {args[0]!r}: {first_line(error)}") from error


def _column(dataset, column: str | None, source: str, first_of_list: bool) -> list[str]:
    names = dataset.column_names
    if column is None:
        column = next((name for name in TEXT_COLUMNS if name in names), None)
        if column is None and len(names) == 1:
            column = names[0]
    if column not in names:
        raise PromptError(f"{source!r}: no prompt column (columns: {', '.join(names)}); "
                          "set prompts.column")
    prompts = []
    for value in dataset[column]:
        if isinstance(value, list) and first_of_list:
            value = value[0] if value else ""
        if isinstance(value, str) and value.strip():
            prompts.append(value.strip())
    return prompts


def confirm_asked(spec: StudySpec) -> bool:
    """The spec has a `[confirm]` table that names its prompts (count or source)."""
    return spec.confirm.num_samples is not None or spec.confirm.source is not None


def confirm_prompts(spec: StudySpec) -> list[str]:
    """The prompts of confirmation: `[confirm] source` (default: the search's), skipping the
    search's own prompts when the source is the same."""
    prompts, confirm = spec.prompts, spec.confirm
    source = confirm.source or prompts.source
    wanted = confirm.num_samples or prompts.num_samples
    skip = prompts.num_samples if source == prompts.source else 0
    try:
        texts = prompts_of(prompts, skip + wanted, source)
    except PromptError as error:
        if "has only" not in str(error):
            raise
        raise PromptError(f"confirmation needs {wanted} unseen prompts after the search's {skip} "
                          f"from {source!r}, which has fewer: set [confirm] num_samples or "
                          "[confirm] source") from None
    return texts[skip:]
