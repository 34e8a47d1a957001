"""`optsearch dashboard`: optuna-dashboard on a storage, with our artifact store attached."""

from __future__ import annotations

from .artifacts import open_artifact_store
from .storage import mask, open_storage


def serve(storage_url: str | None, host: str = "127.0.0.1", port: int = 8080,
          artifact_dir: str = "artifacts") -> None:
    """Serve until interrupted. Binds 127.0.0.1 unless told otherwise."""
    from optuna_dashboard import run_server

    storage = open_storage(storage_url, heartbeat_interval=None, must_exist=True)
    store = open_artifact_store(artifact_dir)
    print(f"optuna-dashboard for {mask(storage.url)} on http://{host}:{port}/", flush=True)
    run_server(storage, host=host, port=port, artifact_store=store)


def write_trial_note(study, trial_id: int, body: str) -> None:
    """Set a trial's Markdown note (optuna-dashboard's notes live in the study's system attrs, so a
    finished trial's note can still be updated, as `study confirm` does)."""
    from optuna_dashboard._note import note_ver_key, save_note_with_version

    storage = study._storage
    version = storage.get_study_system_attrs(study._study_id).get(note_ver_key(trial_id), 0) + 1
    save_note_with_version(storage, study._study_id, trial_id, version, body)
