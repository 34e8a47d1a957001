"""Fixture files in the layouts the libraries' own caches use, so hub paths run offline.

- models: the hub cache (`$HF_HOME/hub/models--org--name/snapshots/<sha>/`, `refs/main`), as
  `huggingface_hub` leaves it after a download.
- datasets: the hub snapshot of the repo's parquet files, and the Arrow cache `datasets` prepares
  from them on a first online load (`$HF_HOME/datasets/org___name/default/0.0.0/<sha>/`), which is
  what `load_dataset("org/name")` reads with HF_HUB_OFFLINE=1.
Schemas follow the real repos (sources in test_first_run.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

SHA = "036f3f8291db64d17faad9b09e59dd30bb65c4d7"


def snapshot(home: Path, repo_type: str, repo_id: str, sha: str = SHA) -> Path:
    """The snapshot folder of `repo_id` in the hub cache (created, with refs/main)."""
    repo = home / "hub" / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    folder = repo / "snapshots" / sha
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cached_dataset(home: Path, repo_id: str, splits: dict[str, dict[str, list]]) -> None:
    """Lay out `repo_id` with one parquet file per split, then the Arrow cache `datasets` builds."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    folder = snapshot(home, "dataset", repo_id)
    (folder / "data").mkdir(exist_ok=True)
    for split, columns in splits.items():
        pq.write_table(pa.table(columns), folder / "data" / f"{split}-00000-of-00001.parquet")
    files = DataFilesDict.from_patterns({s: [f"data/{s}-*"] for s in splits}, base_path=str(folder))
    name = repo_id.split("/")[1]
    builder = Parquet(cache_dir=str(home / "build"), dataset_name=name, hash=SHA,
                      config_name="default", data_files=files)
    builder.download_and_prepare()
    target = home / "datasets" / repo_id.replace("/", "___") / "default" / "0.0.0" / SHA
    shutil.copytree(builder.cache_dir, target)
    shutil.rmtree(home / "build")


def cached_pipeline(home: Path, repo_id: str, fp16_variant: bool, safety_checker: bool) -> None:
    """builtin:tiny saved as a hub snapshot, optionally with fp16 files and a safety checker."""
    import torch

    from optsearch.measure.builtin import build_builtin

    pipe = build_builtin("builtin:tiny")
    if safety_checker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPConfig, CLIPImageProcessor

        tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                     num_attention_heads=4, projection_dim=32)
        config = CLIPConfig(text_config={**tower, "vocab_size": 100},
                            vision_config={**tower, "image_size": 32, "patch_size": 8},
                            projection_dim=32)
        pipe.register_modules(safety_checker=StableDiffusionSafetyChecker(config),
                              feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
        pipe.register_to_config(requires_safety_checker=True)
    folder = snapshot(home, "model", repo_id, sha="a" * 40)
    pipe.save_pretrained(folder)
    if fp16_variant:  # marked (conv_in bias + 1) so a test can tell which files were read
        pipe.to(torch.float16)
        with torch.no_grad():
            pipe.unet.conv_in.bias += 1
        pipe.save_pretrained(folder, variant="fp16")
