"""Prompt sources: COCO-2017 captions, PartiPrompts, the bundled list, a local file, or a folder
of images with their prompts.

Hub datasets, local files and folders all go through `datasets`, so users' hub caches, offline
mode and file formats work as they expect. The first `num_samples` prompts are taken in the
source's order, or after a seeded shuffle.

An image-conditioned pipeline (an editing one such as FLUX Kontext, image-to-video) takes an image
with each prompt: `prompts.image_column` names the column that holds it (a path, relative to the
file), and a folder (datasets' imagefolder: images with a metadata.jsonl) holds one per prompt.
Such a prompt is a `ConditionedPrompt`: its text everywhere prompts go, its image in the call.
"""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

from optsearch.errors import PromptError, first_line
from optsearch.measure.hub import missing, offline_reason

# source -> (dataset id, split, column, take the first element of a list column)
HUB_SOURCES = {
    "coco2017": ("phiyodr/coco2017", "validation", "captions", True),
    "parti": ("nateraw/parti-prompts", "train", "Prompt", False),
}
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv",
                 ".parquet": "parquet"}
TEXT_COLUMNS = ("prompt", "Prompt", "caption", "text", "captions")
FOLDER_IMAGE_COLUMN = "image"  # what datasets' imagefolder calls each row's image


class ConditionedPrompt(str):
    """A prompt with the image the pipeline conditions on (the image to edit, a video's first
    frame): its text wherever prompts go (CLIP, records, keys), its image in the pipeline call."""

    image: object  # a PIL image, RGB

    def __new__(cls, text: str, image=None) -> ConditionedPrompt:
        prompt = super().__new__(cls, text)
        prompt.image = image
        return prompt

    def __reduce__(self):
        return ConditionedPrompt, (str(self), self.image)


def conditioning_images(prompts: list[str]) -> list | None:
    """The images of `prompts`, None when they carry none (text-only prompts)."""
    images = [getattr(prompt, "image", None) for prompt in prompts]
    return images if any(image is not None for image in images) else None


def is_folder(source: str, base: Path | None = None) -> bool:
    """A source that names a folder of images with their prompts (datasets' imagefolder): one
    that ends with a slash (it may not be there yet), or an existing folder (relative to `base`,
    default the working directory)."""
    return source not in HUB_SOURCES and source != "builtin" and (
        source.endswith(("/", "\\")) or ((base or Path()) / Path(source).expanduser()).is_dir())




def builtin_prompts() -> list[str]:
    """Our own COCO-style captions, bundled with the package (no network)."""
    text = resources.files("optsearch").joinpath("data/prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_prompts(source: str, num_samples: int, seed: int = 42, shuffle: bool = False,
                 column: str | None = None, image_column: str | None = None) -> list[str]:
    """Return `num_samples` prompts from `source`, deterministically; with `image_column` (or
    from a folder) each a `ConditionedPrompt` holding its image. Only the images of the prompts
    taken are read."""
    rows = _all_prompts(source, column, image_column)
    if num_samples > len(rows):
        raise PromptError(
            f"prompts.num_samples={num_samples} but source {source!r} has only {len(rows)} "
            "prompts: lower num_samples or use a larger source"
        )
    if shuffle:
        rows = list(rows)
        random.Random(seed).shuffle(rows)
    return [text if image is None else ConditionedPrompt(text, _read_image(image, source))
            for text, image in rows[:num_samples]]


def is_local(source: str) -> bool:
    """Prompts read without a network: the bundled set or a file."""
    return source not in HUB_SOURCES


def prompts_of(prompts, count: int | None = None, source: str | None = None) -> list[str]:
    """The prompts a spec's [prompts] table names (a `PromptSpec`): its first `count` (default its
    num_samples), from `source` instead of its own when given."""
    return load_prompts(source or prompts.source, count or prompts.num_samples, prompts.seed,
                        prompts.shuffle, prompts.column, prompts.image_column)


def _all_prompts(source: str, column: str | None,
                 image_column: str | None = None) -> list[tuple[str, object]]:
    """Every (prompt, image) row of `source`, the image unread (None without an image column)."""
    if source in HUB_SOURCES or source == "builtin":
        if image_column is not None:
            raise PromptError(f"prompts.image_column: prompt set {source!r} holds no images; "
                              "name a file whose column holds image paths, or a folder")
        return [(text, None) for text in _text_prompts(source, column)]
    path = Path(source).expanduser()
    if is_folder(source):
        if not path.is_dir():
            raise PromptError(f"prompt folder {source!r} does not exist")
        dataset = _load_dataset("imagefolder", data_dir=str(path), split="train")
        return _rows(dataset, column, image_column or FOLDER_IMAGE_COLUMN, source, path)
    if not path.is_file():
        raise PromptError(f"prompt file {source!r} does not exist")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise PromptError(f"prompt file {source!r}: unknown format (allowed: {', '.join(FILE_BUILDERS)})")
    if path.stat().st_size == 0:
        raise PromptError(f"prompt file {source!r} is empty")
    dataset = _load_dataset(builder, data_files=str(path), split="train")
    rows = _rows(dataset, column, image_column, source, path.parent)
    if not rows:
        raise PromptError(f"prompt file {source!r} holds no prompts")
    return rows


def _text_prompts(source: str, column: str | None) -> list[str]:
    if source == "builtin":
        return builtin_prompts()
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
    return [text for text, _ in _rows(dataset, column or default_column, None, source,
                                      first_of_list=first_of_list)]


def _load_dataset(*args, **kwargs):
    import datasets  # seconds to import: only when prompts are read through it

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as error:  # datasets raises many types; the first line says what went wrong
        raise PromptError(f"cannot load prompts from {args[0]!r}: {first_line(error)}") from error


def _rows(dataset, column: str | None, image_column: str | None, source: str,
          folder: Path | None = None, first_of_list: bool = True) -> list[tuple[str, object]]:
    """The (prompt, image) rows with a prompt; an image as the dataset holds it (a path relative
    to `folder`, or datasets' undecoded image), read only for the prompts taken."""
    names = dataset.column_names
    if column is None:
        column = next((name for name in TEXT_COLUMNS if name in names), None)
        if column is None and len([name for name in names if name != image_column]) == 1:
            column = next(name for name in names if name != image_column)
    if column not in names:
        raise PromptError(f"{source!r}: no prompt column (columns: {', '.join(names)}); "
                          "set prompts.column")
    if image_column is not None and image_column not in names:
        raise PromptError(f"{source!r}: no image column {image_column!r} (columns: "
                          f"{', '.join(names)}); set prompts.image_column")
    if image_column is not None and hasattr(dataset.features[image_column], "decode"):
        import datasets

        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    images = dataset[image_column] if image_column is not None else [None] * len(dataset)
    rows = []
    for value, image in zip(dataset[column], images, strict=True):
        if isinstance(value, list) and first_of_list:
            value = value[0] if value else ""
        if isinstance(value, str) and value.strip():
            if image_column is not None and isinstance(image, str):
                image = folder / Path(image).expanduser() if folder is not None else Path(image)
            rows.append((value.strip(), image))
    return rows


def _read_image(image, source: str):
    """The RGB image of one row: a path, or datasets' {"path", "bytes"}; one line when it fails."""
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(image, dict):
        where = image.get("path") or "an embedded image"
        opened = (lambda: Image.open(io.BytesIO(image["bytes"]))) if image.get("bytes") \
            else (lambda: Image.open(image["path"]))
    elif isinstance(image, Path):
        where, opened = str(image), (lambda: Image.open(image))
    else:
        raise PromptError(f"{source!r}: an image column value {image!r} is not a path to an image")
    try:
        with opened() as picture:
            return picture.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise PromptError(f"{source!r}: cannot read the image {where}: {first_line(error)}") from None


def confirm_asked(spec) -> bool:
    """The spec has a `[confirm]` table that names its prompts (count or source)."""
    return spec.confirm.num_samples is not None or spec.confirm.source is not None


def confirm_prompts(spec) -> list[str]:
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
