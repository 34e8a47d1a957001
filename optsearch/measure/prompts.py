"""Prompt sources: COCO-2017 captions, PartiPrompts, the bundled list, a local file, or a folder
of images with their prompts.

Hub datasets, local files and folders all go through `datasets`, so users' hub caches, offline
mode and file formats work as they expect. The first `num_samples` prompts are taken in the
source's order, or after a seeded shuffle.

An image-conditioned pipeline (an editing one such as FLUX Kontext, image-to-video) takes an image
with each prompt: `prompts.image_column` names the column that holds it (a path, relative to the
file), and a folder (datasets' imagefolder: images with a metadata.jsonl) holds one per prompt.
An inpainting pipeline (FLUX Fill, Stable Diffusion inpainting) also takes a mask with each image:
`prompts.mask_column`, or a folder's `mask_file_name`. A multi-reference editing pipeline
(FLUX.2, Qwen-Image-Edit-2509) takes several images with one prompt: the column holds a list (a
JSON Lines file's paths, a dataset's images). Such a prompt is a `ConditionedPrompt`: its text
everywhere prompts go, its image(s) (and mask) in the call.
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
FOLDER_MASK_COLUMN = "mask"  # ... and each row's mask_file_name


class ConditionedPrompt(str):
    """A prompt with the image the pipeline conditions on (the image to edit, a video's first
    frame) and, for inpainting, the mask of the region to fill: its text wherever prompts go
    (CLIP, records, keys), its image and mask in the pipeline call."""

    image: object  # a PIL image, RGB; or a list of them: the reference images of one prompt
    mask: object  # a PIL image, L (white: fill), or None

    def __new__(cls, text: str, image=None, mask=None) -> ConditionedPrompt:
        prompt = super().__new__(cls, text)
        prompt.image, prompt.mask = image, mask
        return prompt

    def __reduce__(self):
        return ConditionedPrompt, (str(self), self.image, self.mask)


def conditioning_images(prompts: list[str]) -> list | None:
    """The images of `prompts`, None when they carry none (text-only prompts)."""
    images = [getattr(prompt, "image", None) for prompt in prompts]
    return images if any(image is not None for image in images) else None


def reference_images(prompt: str) -> list:
    """A prompt's images as a list: none, its one image, or its several reference images (a
    multi-reference editing pipeline's: FLUX.2, Qwen-Image-Edit-2509)."""
    image = getattr(prompt, "image", None)
    return [] if image is None else list(image) if isinstance(image, list) else [image]


def conditioning_masks(prompts: list[str]) -> list | None:
    """The inpainting masks of `prompts`, None when they carry none."""
    masks = [getattr(prompt, "mask", None) for prompt in prompts]
    return masks if any(mask is not None for mask in masks) else None


def prompt_seed(seed: int, index: int) -> int:
    """The generator seed of prompt `index`: independent of batch size and position."""
    return seed * 1_000_003 + index


def prompts_digest(prompts: list[str]) -> str:
    """A short hash of the prompts as the pipeline gets them: their texts and, where they carry
    them, their images' and masks' pixels (an edited prompt file, or another copy of a folder on
    another machine, changes it)."""
    import hashlib

    digest = hashlib.sha1()
    for prompt in prompts:
        digest.update(str(prompt).encode() + b"\0")
        for picture in (*reference_images(prompt), getattr(prompt, "mask", None)):
            if picture is not None:
                digest.update(f"{picture.mode}{picture.size}".encode() + picture.tobytes())
    return digest.hexdigest()[:16]


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
                 column: str | None = None, image_column: str | None = None,
                 mask_column: str | None = None) -> list[str]:
    """Return `num_samples` prompts from `source`, deterministically; with `image_column` (or
    from a folder) each a `ConditionedPrompt` holding its image, and with `mask_column` (or a
    folder's masks) its mask. Only the images of the prompts taken are read."""
    rows = _all_prompts(source, column, image_column, mask_column)
    if num_samples > len(rows):
        raise PromptError(
            f"prompts.num_samples={num_samples} but source {source!r} has only {len(rows)} "
            "prompts: lower num_samples or use a larger source"
        )
    if shuffle:
        rows = list(rows)
        random.Random(seed).shuffle(rows)
    return [text if image is None else ConditionedPrompt(
        text, _read_images(image, source), None if mask is None else _read_image(mask, source, "L"))
        for text, image, mask in rows[:num_samples]]


def is_local(source: str) -> bool:
    """Prompts read without a network: the bundled set or a file."""
    return source not in HUB_SOURCES


def prompts_of(prompts, count: int | None = None, source: str | None = None) -> list[str]:
    """The prompts a spec's [prompts] table names (a `PromptSpec`): its first `count` (default its
    num_samples), from `source` instead of its own when given."""
    return load_prompts(source or prompts.source, count or prompts.num_samples, prompts.seed,
                        prompts.shuffle, prompts.column, prompts.image_column,
                        prompts.mask_column)


def _all_prompts(source: str, column: str | None, image_column: str | None = None,
                 mask_column: str | None = None) -> list[tuple[str, object, object]]:
    """Every (prompt, image, mask) row of `source`, images unread (None without their column)."""
    if source in HUB_SOURCES or source == "builtin":
        if image_column is not None or mask_column is not None:
            key = "image_column" if image_column is not None else "mask_column"
            raise PromptError(f"prompts.{key}: prompt set {source!r} holds no images; "
                              "name a file whose column holds image paths, or a folder")
        return [(text, None, None) for text in _text_prompts(source, column)]
    if mask_column is not None and image_column is None and not is_folder(source):
        raise PromptError("prompts.mask_column needs prompts.image_column: the image each mask "
                          "belongs to")
    path = Path(source).expanduser()
    if is_folder(source):
        if not path.is_dir():
            raise PromptError(f"prompt folder {source!r} does not exist")
        dataset = _load_dataset("imagefolder", data_dir=str(path), split="train")
        if mask_column is None and FOLDER_MASK_COLUMN in dataset.column_names:
            mask_column = FOLDER_MASK_COLUMN  # the metadata's mask_file_name
        return _rows(dataset, column, image_column or FOLDER_IMAGE_COLUMN, source, path, mask_column)
    if not path.is_file():
        raise PromptError(f"prompt file {source!r} does not exist")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise PromptError(f"prompt file {source!r}: unknown format (allowed: {', '.join(FILE_BUILDERS)})")
    if path.stat().st_size == 0:
        raise PromptError(f"prompt file {source!r} is empty")
    dataset = _load_dataset(builder, data_files=str(path), split="train")
    rows = _rows(dataset, column, image_column, source, path.parent, mask_column)
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
    return [text for text, _, _ in _rows(dataset, column or default_column, None, source,
                                         first_of_list=first_of_list)]


def _load_dataset(*args, **kwargs):
    import datasets  # seconds to import: only when prompts are read through it

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as error:  # datasets raises many types; the first line says what went wrong
        raise PromptError(f"cannot load prompts from {args[0]!r}: {first_line(error)}") from error


def _rows(dataset, column: str | None, image_column: str | None, source: str,
          folder: Path | None = None, mask_column: str | None = None,
          first_of_list: bool = True) -> list[tuple[str, object, object]]:
    """The (prompt, image, mask) rows with a prompt; an image as the dataset holds it (a path
    relative to `folder`, or datasets' undecoded image), read only for the prompts taken."""
    names = dataset.column_names
    if column is None:
        column = next((name for name in TEXT_COLUMNS if name in names), None)
        others = [name for name in names if name not in (image_column, mask_column)]
        if column is None and len(others) == 1:
            column = others[0]
    if column not in names:
        raise PromptError(f"{source!r}: no prompt column (columns: {', '.join(names)}); "
                          "set prompts.column")
    columns = {}
    for key, name in (("image_column", image_column), ("mask_column", mask_column)):
        if name is None:
            columns[key] = [None] * len(dataset)
            continue
        if name not in names:
            raise PromptError(f"{source!r}: no {key.split('_')[0]} column {name!r} (columns: "
                              f"{', '.join(names)}); set prompts.{key}")
        feature = dataset.features[name]  # an image, or a list of them (a prompt's references)
        if hasattr(feature, "decode") or hasattr(getattr(feature, "feature", None), "decode"):
            import datasets

            undecoded = datasets.Image(decode=False)  # read only for the prompts taken
            dataset = dataset.cast_column(name, undecoded if hasattr(feature, "decode")
                                          else type(feature)(undecoded))
        columns[key] = [_located(value, folder) for value in dataset[name]]
    rows = []
    for value, image, mask in zip(dataset[column], columns["image_column"], columns["mask_column"],
                                  strict=True):
        if isinstance(value, list) and first_of_list:
            value = value[0] if value else ""
        if isinstance(value, str) and value.strip():
            if mask_column is not None and image is not None and mask is None:
                raise PromptError(f"{source!r}: the prompt {value.strip()[:60]!r} has an image "
                                  "but no mask: give every image its mask")
            rows.append((value.strip(), image, mask))
    return rows


def _located(value, folder: Path | None):
    """A column's image as a path (a string one relative to `folder`, a file's folder), or as
    datasets holds it (a folder's {"path", "bytes"}); None stays None."""
    if isinstance(value, list):  # several images: a prompt's references
        return [_located(one, folder) for one in value] or None
    if not isinstance(value, str):
        return value
    return folder / Path(value).expanduser() if folder is not None else Path(value)


def _read_images(image, source: str):
    """A row's image, or where its column holds a list of them (a JSON Lines file's
    `"images": ["a.png", "b.png"]`), every one: the prompt's reference images."""
    if isinstance(image, list):
        images = [_read_image(one, source) for one in image]
        return images[0] if len(images) == 1 else images  # one is a prompt's one image
    return _read_image(image, source)


def _read_image(image, source: str, mode: str = "RGB"):
    """The image of one row (RGB; a mask: L): a path, or datasets' {"path", "bytes"}; one line
    when it fails."""
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
            return picture.convert(mode)
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
