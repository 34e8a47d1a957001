"""LPIPS beside PSNR and SSIM (issue 25, item 6): AlexNet's weights from the torch hub cache, as
any user's torchvision keeps them, here a random-weight file in that layout (no network)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torchvision

from optsearch.errors import ModelLoadError
from optsearch.measure.perceptual import Lpips, alexnet_weights
from optsearch.optimize import objectives
from optsearch.study_spec import SpecError, spec_from_dict

from .conftest import TINY_SPEC, optsearch_cmd, write_spec


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A torch hub cache holding AlexNet's weights file (random weights, torchvision's layout)."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    path = alexnet_weights()
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return home


def test_without_alexnets_weights_offline_lpips_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as error:
        Lpips()
    message = str(error.value)
    assert "\n" not in message and "alexnet-owt-7be5be79.pth" in message
    assert str(tmp_path / "empty") in message and "TORCH_HOME" in message


def test_lpips_is_zero_for_the_same_image_and_grows_with_the_change(torch_home):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    noise = rng.normal(0, 1, images.shape)
    slightly = np.clip(images + 8 * noise, 0, 255).astype(np.uint8)
    badly = np.clip(images + 64 * noise, 0, 255).astype(np.uint8)
    lpips = Lpips()
    assert lpips.distances(images, images) == pytest.approx([0.0] * 3, abs=1e-6)
    small, large = lpips.distances(images, slightly), lpips.distances(images, badly)
    assert all(0 < s < b for s, b in zip(small, large, strict=True))
    videos = np.stack([images, badly], axis=1)  # 3 videos of 2 frames: the frames' mean
    assert lpips.distances(videos, videos[:, ::-1]) == pytest.approx(large, rel=1e-4)


def test_a_lpips_limit_is_a_distance_in_0_1():
    spec = {"model": {"id": "builtin:tiny"}, "quality": {"metric": "lpips", "limit": 5.0}}
    with pytest.raises(SpecError, match="not an LPIPS distance limit"):
        spec_from_dict(spec)
    lpips_spec = spec_from_dict({**spec, "quality": {"metric": "lpips", "limit": 0.2}})
    assert lpips_spec.quality.measures_lpips
    close = {"lpips": {"mean": 0.1, "low": 0.05, "high": 0.15}}  # a distance: lower is better
    far = {"lpips": {"mean": 0.3, "low": 0.25, "high": 0.35}}
    assert objectives.constraints(lpips_spec, close)["quality"] == pytest.approx(-0.1)
    assert objectives.constraints(lpips_spec, far)["quality"] == pytest.approx(0.1)


def test_evaluate_reports_lpips_with_its_interval_beside_psnr(tmp_path, torch_home):
    text = (TINY_SPEC.replace('metric = "psnr"', 'metric = "lpips"').replace("limit = 30.0", "limit = 0.2"))
    spec = write_spec(tmp_path / "tiny.toml", text)
    ran = optsearch_cmd("evaluate", str(spec), "--set", "deepcache.cache_interval=4", "--json",
                        "--quiet", env={**os.environ, "TORCH_HOME": str(torch_home)})
    assert ran.returncode == 0, ran.stderr
    figures = json.loads(ran.stdout)
    lpips = figures["lpips"]
    assert 0 < lpips["low"] <= lpips["mean"] <= lpips["high"]
    assert len(figures["per_prompt"]["lpips"]) == 4 and "psnr" in figures  # beside the others
    assert figures["lpips_worst"] == max(figures["per_prompt"]["lpips"])
