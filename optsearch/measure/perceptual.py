"""LPIPS: how different two images look to a network trained to judge it (0 = identical).

PSNR and SSIM count pixel differences; a cache that shifts a texture by a pixel loses many dB and
looks the same, one that blurs a face may lose few. LPIPS (Zhang et al. 2018, the `lpips`
package) compares deep features instead, with AlexNet and the package's own linear weights. It is
measured only where a spec asks (`quality.metric = "lpips"` or `quality.lpips = true`): it needs
AlexNet's ImageNet weights, which torchvision keeps in the torch hub cache like any user's.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import numpy as np
import torch

from optsearch.errors import ModelLoadError

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"  # torchvision's
VIDEO_FRAMES = 4  # frames compared per video, evenly sampled (as CLIP scores them)


def alexnet_weights() -> Path:
    """Where torchvision looks for AlexNet's weights (TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_URL.rsplit("/", 1)[-1]


def check_alexnet_weights() -> None:
    """Fail fast, in one line, when AlexNet's weights are neither cached nor downloadable."""
    path = alexnet_weights()
    if path.is_file():
        return
    host = "download.pytorch.org"
    reason = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE") == "1" else None
    if reason is None:
        try:
            socket.create_connection((host, 443), timeout=3).close()
            return  # torchvision downloads it
        except OSError:
            reason = f"{host} is unreachable"
    raise ModelLoadError(
        f"LPIPS needs AlexNet's ImageNet weights ({path.name}), which are not in the torch hub cache "
        f"({path.parent}) and {reason}: download {ALEXNET_URL} there once (or set TORCH_HOME to a "
        "folder that has hub/checkpoints/" + path.name + ")")


class Lpips:
    """The LPIPS model (AlexNet, v0.1 linear weights) on a device, loaded once per process."""

    def __init__(self, device: str | torch.device = "cpu"):
        check_alexnet_weights()
        import lpips

        self.device = torch.device(device)
        with warnings.catch_warnings():  # lpips 0.1.4 asks torchvision in its pre-0.13 words
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.model = lpips.LPIPS(net="alex", version="0.1", verbose=False).to(self.device).eval()

    @torch.no_grad()
    def distances(self, references: np.ndarray, images: np.ndarray) -> list[float]:
        """LPIPS of each uint8 image (N x H x W x 3) against its reference; of a video
        (N x F x H x W x 3), the mean over VIDEO_FRAMES evenly sampled frames."""
        if images.ndim == 5:
            frames = np.linspace(0, images.shape[1] - 1, min(VIDEO_FRAMES, images.shape[1])).round()
            picked = frames.astype(int)
            per_frame = [self.distances(references[:, f], images[:, f]) for f in picked]
            return [float(v) for v in np.mean(per_frame, axis=0)]
        return [float(v) for v in self.model(self._tensor(references), self._tensor(images)).flatten()]

    def _tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 N x H x W x 3 to float N x 3 x H x W in [-1, 1], as LPIPS takes them."""
        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1.0
