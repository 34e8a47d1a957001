"""`optsearch dashboard`: optuna-dashboard on a storage, with our artifact store attached."""

from __future__ import annotations

from optsearch.storage.artifacts import open_artifact_store
from optsearch.storage.rdb import mask, open_storage


def serve(storage_url: str | None, host: str = "127.0.0.1", port: int = 8080,
          artifact_dir: str = "artifacts") -> None:
    """Serve until interrupted. Binds 127.0.0.1 unless told otherwise."""
    from optuna_dashboard import run_server

    storage = open_storage(storage_url, heartbeat_interval=None, must_exist=True)
    store = open_artifact_store(artifact_dir)
    print(f"optuna-dashboard for {mask(storage.url)} on http://{host}:{port}/", flush=True)
    run_server(storage, host=host, port=port, artifact_store=store)
