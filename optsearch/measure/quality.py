"""Image quality: CLIP score (as in the literature), fidelity to the baseline, paired intervals.

CLIP score per image is max(100 * cosine(image, prompt), 0) with an open_clip model. The CLIP loss
of a setting is the mean over prompts of (baseline score - setting score), paired per prompt, with
a Student-t confidence interval from the paired differences. PSNR and SSIM compare each image with
the baseline image of the same prompt.
"""

from __future__ import annotations

import logging
import math
import os
from importlib import resources

import numpy as np
import open_clip
import torch
from huggingface_hub import try_to_load_from_cache
from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives
from PIL import Image

from optsearch.errors import ModelLoadError
from optsearch.measure.hub import missing, offline_reason
from optsearch.measure.metrics import PSNR_CAP
from optsearch.measure.model_ids import TINY_CLIP, check_clip_model

_TINY_CLIP_CONFIG = "optsearch-tiny-clip"

class ClipScorer:
    """An open_clip model loaded once per process; scores images against prompts."""

    def __init__(self, model_name: str, pretrained: str, device: str | torch.device = "cpu"):
        check_clip_model(model_name, open_clip.list_models())  # and any config added in code
        if model_name == TINY_CLIP:
            config = resources.files("optsearch").joinpath(f"data/{_TINY_CLIP_CONFIG}.json")
            with resources.as_file(config) as path:
                open_clip.add_model_config(path)
            model_name = _TINY_CLIP_CONFIG
        tag = None if pretrained in ("none", "", None) else pretrained
        if tag is not None:
            check_clip_weights(model_name, tag)
        torch.manual_seed(0)  # random-weight models are the same in every process
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # open_clip warns on purpose-random weights
        try:
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=tag, device=device
            )
        finally:
            logging.getLogger().setLevel(quiet)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device = torch.device(device)

    @torch.no_grad()
    def image_features(self, images: np.ndarray) -> torch.Tensor:
        """L2-normalized image embeddings of uint8 HxWx3 images."""
        pixels = torch.stack([self.preprocess(Image.fromarray(image)) for image in images])
        features = self.model.encode_image(pixels.to(self.device)).float()
        return features / features.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        features = self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()
        return features / features.norm(dim=-1, keepdim=True)

    def score(self, images: np.ndarray, prompts: list[str]) -> tuple[np.ndarray, torch.Tensor]:
        """CLIP score per (image, prompt) pair, and the image features for fidelity checks."""
        image_features = self.image_features(images)
        cosine = (image_features * self.text_features(prompts)).sum(dim=-1)
        return (100 * cosine).clamp(min=0).cpu().numpy(), image_features


def clip_weights_files(model_name: str, tag: str) -> tuple[str, list[str]] | None:
    """(hub repo, file names in the order open_clip tries them) for a model name and pretrained
    tag, or None when the tag is a local file. Raises ModelLoadError for an unknown tag."""
    if os.path.isfile(os.path.expanduser(tag)):
        return None
    config = open_clip.get_pretrained_cfg(model_name, tag)
    if not config or not config.get("hf_hub"):
        known = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ModelLoadError(f"open_clip has no pretrained weights {tag!r} for {model_name!r} "
                             f"(known tags: {known}; or a local weights file)")
    repo, filename = os.path.split(config["hf_hub"])  # 'org/model/' means the default file name
    filename = filename or HF_WEIGHTS_NAME
    return repo, [*_get_safe_alternatives(filename), filename]


def check_clip_weights(model_name: str, tag: str) -> None:
    """Fail fast, in one line, when the weights are neither cached nor downloadable (no hub):
    otherwise the download retries for about a minute before failing."""
    files = clip_weights_files(model_name, tag)
    if files is None:
        return
    repo, names = files
    if any(isinstance(try_to_load_from_cache(repo, name), str) for name in names):
        return
    reason = offline_reason()
    if reason is None:
        return
    raise ModelLoadError(missing(
        f"CLIP weights {model_name}/{tag} ({repo}/{names[-1]})", reason,
        "download them once where the hub is reachable, point HF_HOME at a cache that has them, "
        "or set quality.clip_pretrained to a local file"))


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB, capped at PSNR_CAP."""
    mse = np.mean((reference.astype(np.float64) - image.astype(np.float64)) ** 2)
    if mse == 0:
        return PSNR_CAP
    return min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))


def _gaussian_kernel(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def ssim(reference: np.ndarray, image: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004, Gaussian window 11/1.5) averaged over channels."""
    return ssim_batch(reference[None], image[None])[0]


def ssim_batch(references: np.ndarray, images: np.ndarray,
               device: str | torch.device = "cpu") -> list[float]:
    """SSIM of each (reference, image) pair of uint8 NxHxWx3 arrays, computed on `device`.

    The Gaussian blur is separable: two 1-D depthwise passes over the five moments of all pairs
    at once (a grouped convolution is about 5x faster on CPU than a batch of 1-channel ones).
    """
    def channels(array: np.ndarray) -> torch.Tensor:  # N x H x W x 3 -> 3N x 1 x H x W in [0, 1]
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device).float() / 255
        return tensor.permute(0, 3, 1, 2).reshape(-1, 1, *tensor.shape[1:3])

    x, y = channels(references), channels(images)
    size = min(11, x.shape[-1], x.shape[-2])
    kernel = _gaussian_kernel(size).to(x.device)
    moments = torch.cat([x, y, x * x, y * y, x * y]).transpose(0, 1)  # 1 x 5*3N x H x W
    groups = moments.shape[1]
    blurred = torch.nn.functional.conv2d(moments, kernel.view(1, 1, -1, 1).expand(groups, 1, -1, 1),
                                         groups=groups)
    blurred = torch.nn.functional.conv2d(blurred, kernel.view(1, 1, 1, -1).expand(groups, 1, 1, -1),
                                         groups=groups)
    mu_x, mu_y, xx, yy, xy = blurred.transpose(0, 1).chunk(5)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.reshape(len(references), -1).mean(dim=1).tolist()
