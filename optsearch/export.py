"""Writing results: images of an evaluation, and (later) search_params.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .accelerators import ORDER, normalize_setting


def default_setting(combo) -> dict[str, dict]:
    """Each accelerator of `combo` at its library's default parameters."""
    return normalize_setting({name: {} for name in ORDER if name in combo})


def save_images(folder: Path, baseline: np.ndarray, setting: list[np.ndarray]) -> None:
    """Write baseline_NNN.png and setting_NNN.png per prompt index."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(baseline):
        Image.fromarray(image).save(folder / f"baseline_{index:03d}.png")
    for index, image in enumerate(setting):
        Image.fromarray(image).save(folder / f"setting_{index:03d}.png")
