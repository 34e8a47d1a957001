"""The study's artifact store (Optuna's artifact API): baseline image archives and image grids
(for videos: a grid of first frames, and per prompt an animated WebP of baseline and trial side
by side, which the dashboard shows like any image).

A local folder by default (`[artifacts] path` in the spec, or --artifact-dir); an s3:// URL uses
Optuna's Boto3 store (boto3 must be installed).
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
import optuna
from optuna.artifacts import (
    FileSystemArtifactStore,
    download_artifact,
    get_all_artifact_meta,
    upload_artifact,
)
from PIL import Image, ImageDraw, ImageFont

from optsearch.errors import UsageError
from optsearch.measure.prompts import reference_images


def open_artifact_store(location: str):
    """A FileSystemArtifactStore for a folder, a Boto3ArtifactStore for s3://bucket/prefix."""
    if location.startswith("s3://"):
        try:
            import boto3  # noqa: F401
        except ImportError:
            raise UsageError("an s3:// artifact store needs boto3: pip install boto3") from None
        from optuna.artifacts import Boto3ArtifactStore

        bucket = location.removeprefix("s3://").split("/", 1)[0]
        return Boto3ArtifactStore(bucket)
    make_artifact_folder(location)
    return FileSystemArtifactStore(location)


def make_artifact_folder(location: str) -> None:
    """The local artifact folder made (a bucket's prefix needs none), or one line saying why it
    cannot be: the commands call it before a model loads or a study is written."""
    if location.startswith("s3://"):
        return
    try:
        Path(location).mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file of that name, no permission: the user's to fix
        raise UsageError(f"artifact folder {location}: cannot be made ({error.strerror}): set "
                         "artifacts.path or --artifact-dir to a folder") from None


def upload_bytes(store, target: optuna.Study | optuna.Trial, name: str, data: bytes,
                 mimetype: str) -> str:
    """Upload `data` under the file name `name` (the name the dashboard shows)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, name)
        Path(path).write_bytes(data)
        return upload_artifact(artifact_store=store, file_path=path, study_or_trial=target,
                               mimetype=mimetype)


def upload_once(store, target: optuna.Study | optuna.Trial, name: str, data: bytes,
                mimetype: str) -> None:
    """`upload_bytes`, unless `target` already holds an artifact named `name`: safe to repeat
    after a database error, whose write may have landed (no second grid in the dashboard)."""
    if any(meta.filename == name for meta in get_all_artifact_meta(target)):
        return
    upload_bytes(store, target, name, data, mimetype)


def upload_arrays(store, target, name: str, **arrays: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return upload_bytes(store, target, name, buffer.getvalue(), "application/octet-stream")


def download_arrays(store, artifact_id: str) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "arrays.npz")
        download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=path)
        with np.load(path) as archive:
            return {key: archive[key] for key in archive.files}


def image_grid(rows: list[tuple[str, np.ndarray, np.ndarray | None]], title: str,
               cell: int = 192, inputs: list | None = None) -> bytes:
    """A PNG: one row per prompt with its baseline image and (if given) the trial's image, after
    the image it was generated from where the pipeline took one (`inputs`: an edit's source,
    a video's first frame).

    Small images are scaled up (nearest neighbour) to `cell` pixels so they can be inspected.
    """
    font = ImageFont.load_default()
    with_trial = bool(rows) and rows[0][2] is not None
    names = ["input"] * (inputs is not None) + ["baseline"] + ["trial"] * with_trial
    columns = len(names)
    label, header, gap = 16, 22, 4
    width = columns * cell + (columns + 1) * gap
    height = header + len(rows) * (cell + label + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), title, fill="black", font=font)
    for index, (prompt, baseline, trial) in enumerate(rows):
        top = header + index * (cell + label + gap)
        draw.text((gap, top + 2), _fit(prompt, width // 6), fill="black", font=font)
        shown = ([] if inputs is None else [inputs[index]]) + [baseline] + [trial] * with_trial
        for column, image in enumerate(shown):
            left = gap + column * (cell + gap)
            picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
            canvas.paste(picture.resize((cell, cell), Image.NEAREST), (left, top + label))
            if index == 0:
                draw.text((left + 3, top + label + 3), names[column], fill="yellow", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _fit(text: str, characters: int) -> str:
    return text if len(text) <= characters else text[: characters - 1] + "…"


def upload_grid(store, target, name: str, title: str, prompts: list[str], count: int,
                baseline_images, trial_images=None, fps: int = 16) -> None:
    """An image grid of the first `count` prompts: baseline (and trial) images side by side.
    Videos: the grid shows first frames, and each prompt gets `<name>-NN.webp`, animated.
    A file `target` already holds is not uploaded again, so a repeat after a database error
    (`retried`) adds only what is missing."""
    if count == 0:
        return
    shown = min(count, len(baseline_images) if trial_images is None else len(trial_images))
    video = np.asarray(baseline_images[0]).ndim == 4

    def first(images, index):
        return None if images is None else (images[index][0] if video else images[index])

    rows = [(prompts[i], first(baseline_images, i), first(trial_images, i)) for i in range(shown)]
    inputs = [_input_of(prompts[i]) for i in range(shown)]
    upload_once(store, target, name, image_grid(
        rows, title, inputs=inputs if all(image is not None for image in inputs) else None), "image/png")
    if video:
        stem = name.removesuffix(".png")
        for index in range(shown):
            frames = [baseline_images[index]] + ([] if trial_images is None else [trial_images[index]])
            upload_once(store, target, f"{stem}-{index:02d}.webp", animated_webp(frames, fps),
                        "image/webp")


def _input_of(prompt):
    """The image a prompt was generated from; an inpainting one's with the mask's region tinted
    (None for a text prompt)."""
    images, mask = reference_images(prompt), getattr(prompt, "mask", None)
    if len(images) > 1:  # a multi-reference prompt's images, side by side in one cell
        height = images[0].height
        scaled = [one.resize((max(1, one.width * height // one.height), height)) for one in images]
        strip, left = Image.new("RGB", (sum(one.width for one in scaled), height)), 0
        for one in scaled:
            strip.paste(one, (left, 0))
            left += one.width
        return strip
    image = images[0] if images else None
    if image is None or mask is None:
        return image
    tinted = Image.blend(image, Image.new("RGB", image.size, (255, 0, 64)), 0.5)
    return Image.composite(tinted, image, mask.resize(image.size))


def animated_webp(videos: list[np.ndarray], fps: int, cell: int = 192) -> bytes:
    """An animated WebP of videos (F x H x W x 3 each) side by side, looping, small ones scaled
    up (nearest neighbour) to `cell` pixels high."""
    height, width = videos[0].shape[1:3]
    scale = max(1, cell // height)
    frames = []
    for index in range(len(videos[0])):
        row = np.concatenate([video[index] for video in videos], axis=1)
        frames.append(Image.fromarray(row).resize((row.shape[1] * scale, height * scale),
                                                  Image.NEAREST))
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], loop=0,
                   duration=round(1000 / fps), lossless=True)
    return buffer.getvalue()
