"""The study's artifact store (Optuna's artifact API): baseline image archives and image grids.

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
from optuna.artifacts import FileSystemArtifactStore, download_artifact, upload_artifact

from .errors import UsageError


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
    Path(location).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(location)


def upload_bytes(store, target: optuna.Study | optuna.Trial, name: str, data: bytes,
                 mimetype: str) -> str:
    """Upload `data` under the file name `name` (the name the dashboard shows)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, name)
        Path(path).write_bytes(data)
        return upload_artifact(artifact_store=store, file_path=path, study_or_trial=target,
                               mimetype=mimetype)


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
