"""Shared fixtures: real tiny pipelines (built once per session) and a tiny CLIP model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from optsearch.models import load_pipeline
from optsearch.quality import ClipScorer

ROOT = Path(__file__).resolve().parents[1]
OPTSEARCH = str(Path(sys.executable).with_name("optsearch"))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_pipe():
    return load_pipeline("builtin:tiny", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_xl_pipe():
    return load_pipeline("builtin:tiny-xl", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_clip():
    return ClipScorer("builtin:tiny", "none")


def generate_images(call, prompts, steps=10, seed=0, reseed=None) -> np.ndarray:
    """Images of one call with one seeded generator per prompt (float, 0..1)."""
    if reseed is not None:
        reseed(seed)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return call(prompts, num_inference_steps=steps, output_type="np", generator=generators).images


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_SPEC = """
name = "tiny"
[model]
id = "builtin:tiny"
device = "cpu"
dtype = "float32"
steps = 8
[prompts]
source = "builtin"
num_samples = 4
batch_size = 2
[quality]
clip_model = "builtin:tiny"
clip_pretrained = "none"
metric = "psnr"
limit = 30.0
[search]
accelerators = ["deepcache", "tome"]
n_trials = 4
"""
