"""What a model id names, told without loading it (and without importing diffusers, so a spec is
checked in a fraction of a second): a builtin model, a `module:function` factory, a local folder
or a hub id, and whether its denoiser is a UNet or a transformer."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from optsearch.errors import ModelLoadError

BUILTIN_KINDS = {"builtin:tiny": "unet", "builtin:cpu-bench": "unet", "builtin:tiny-xl": "unet",
                 "builtin:sd15-random": "unet", "builtin:tiny-flux": "transformer",
                 "builtin:tiny-flux-kontext": "transformer", "builtin:tiny-flux-fill": "transformer",
                 "builtin:tiny-flux-control": "transformer",
                 "builtin:tiny-sd-inpaint": "unet", "builtin:tiny-sd-img2img": "unet",
                 "builtin:tiny-flux-img2img": "transformer", "builtin:tiny-flux2": "transformer",
                 "builtin:tiny-flux2-klein": "transformer",
                 "builtin:tiny-sd-controlnet": "unet", "builtin:tiny-flux-controlnet": "transformer",
                 "builtin:tiny-sd3": "transformer", "builtin:tiny-qwen-image": "transformer",
                 "builtin:tiny-qwen-image-edit": "transformer",
                 "builtin:tiny-qwen-image-edit-plus": "transformer",
                 "builtin:tiny-z-image": "transformer",
                 "builtin:tiny-wan": "video", "builtin:tiny-wan22": "video",
                 "builtin:tiny-wan-i2v": "video"}
BUILTIN_MODELS = tuple(BUILTIN_KINDS)

# Diffusion transformers by the name their hub ids carry, when no model_index.json is at hand;
# the video ones first (their pipelines return frames).
VIDEO_NAMES = ("wan2", "wan-", "hunyuanvideo", "hunyuan-video", "cogvideo", "ltx-video", "ltx-2",
               "mochi", "skyreels", "allegro", "latte", "easyanimate", "sana-video", "-t2v", "-i2v",
               "-ti2v")
TRANSFORMER_NAMES = ("flux", "sd3", "stable-diffusion-3", "qwen-image", "wan", "hunyuan", "ltx",
                     "cogview", "chroma", "sana", "pixart", "lumina", "hidream", "z-image",
                     "glm-image", "ovis-image", "longcat-image", "ernie-image", "auraflow", "bria",
                     "kandinsky-5")
# the video pipeline classes (a model_index.json's _class_name), by prefix: every one of
# diffusers 0.42 whose call takes `num_frames` (what `pipeline_kind` calls video once loaded;
# tests/test_video.py holds the two to agree), and Latte's and Wan's video-to-video, which take none
VIDEO_PIPELINES = ("Wan", "CogVideoX", "HunyuanVideo", "HunyuanSkyreels", "LTX", "Mochi", "SkyReels",
                   "Allegro", "Latte", "AnyFlow", "ChronoEdit", "Cosmos2VideoToWorld", "Cosmos2_5",
                   "Cosmos3Omni", "CosmosTextToWorld", "CosmosVideoToWorld", "EasyAnimate", "Helios",
                   "Kandinsky5I2V", "Kandinsky5T2V", "Kandinsky6TI2V", "LucyEdit", "MotifVideo",
                   "SanaWM")

TINY_CLIP = "builtin:tiny"  # quality.clip_model: the random-weight CLIP the tests and demo use

FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_factory(model_id: str) -> bool:
    """`module.path:function` names a factory that builds the pipeline (like `uvicorn app:app`)."""
    return not model_id.startswith("builtin:") and bool(FACTORY.match(model_id))


def check_folder(model_id: str, what: str) -> None:
    """A model id that names a folder (hub ids look like "org/name") must be one. Said before
    torch and diffusers load, and again by the loader."""
    if model_id.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(model_id)):
        raise ModelLoadError(f"{what} folder {model_id!r} does not exist")


def check_folders(model) -> None:
    """The folders a spec's `[model]` names (`ModelSpec`): there, before anything loads."""
    check_folder(model.id, "model")
    for controlnet in model.controlnets:
        check_folder(controlnet, "model.controlnet")
    for lora in model.lora_sources:
        if not os.path.isfile(os.path.expanduser(lora)):  # a weight file, or a folder or hub id
            check_folder(lora, "model.lora")


def model_kind(model_id: str) -> str | None:
    """'unet', 'transformer' or 'video' for a model id without loading it, None when it cannot be
    told (a factory): builtin names, a folder's or the hub cache's model_index.json, else the name."""
    if model_id in BUILTIN_KINDS:
        return BUILTIN_KINDS[model_id]
    if is_factory(model_id):
        return None  # module:function factory: known once built
    index = _model_index(model_id)
    if index is not None:
        if index.get("unet"):
            return "unet"
        return "video" if str(index.get("_class_name", "")).startswith(VIDEO_PIPELINES) else "transformer"
    name = model_id.lower()
    if any(marker in name for marker in VIDEO_NAMES):
        return "video"
    return "transformer" if any(marker in name for marker in TRANSFORMER_NAMES) else "unet"


def _model_index(model_id: str) -> dict | None:
    """The pipeline's model_index.json from its folder or the local hub cache (no download)."""
    path = os.path.join(os.path.expanduser(model_id), "model_index.json")
    if not os.path.isfile(path) and model_id.count("/") == 1:
        try:
            cached = try_to_load_from_cache(model_id, "model_index.json")
        except ValueError:  # not a hub id ("./sd" from a spec dict: a folder that is not there)
            cached = None
        path = cached if isinstance(cached, str) else path
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def clip_architectures() -> list[str]:
    """open_clip's architecture names (what `open_clip.list_models()` gives), read from its
    model_configs folder: importing open_clip takes seconds."""
    package = importlib.util.find_spec("open_clip")
    folder = Path(package.submodule_search_locations[0]) / "model_configs"
    return sorted(path.stem for path in folder.glob("*.json"))


def check_clip_model(model_name: str, known: list[str] | None = None) -> None:
    """An architecture open_clip knows (`known`: by default its shipped configs; or one it fetches:
    hf-hub:, local-dir:), else one line: open_clip's own error lists all ~150 configs in one line."""
    known = clip_architectures() if known is None else known
    if model_name == TINY_CLIP or model_name.startswith(("hf-hub:", "local-dir:")) \
            or model_name in known:
        return
    raise ModelLoadError(
        f"unknown CLIP model {model_name!r}: not one of open_clip's {len(known)} architectures "
        "(e.g. ViT-g-14, ViT-L-14, ViT-B-32; open_clip.list_models() lists them), hf-hub:ORG/NAME "
        f"or local-dir:PATH ({TINY_CLIP} is the random-weight test model)")
