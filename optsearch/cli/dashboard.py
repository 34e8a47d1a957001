"""`optsearch dashboard`: optuna-dashboard on a storage, with our artifact store attached."""

from __future__ import annotations

import os
import socket

from optsearch.errors import UsageError
from optsearch.optimize.study import SPEC_ATTR
from optsearch.storage.artifacts import open_artifact_store
from optsearch.storage.rdb import mask, open_storage


def stored_artifact_dir(storage) -> str:
    """The artifacts folder the storage's studies were created with (their specs store it
    absolute), so a dashboard started from any folder shows their images; `artifacts` if none."""
    paths = []
    for study in storage.get_all_studies():
        path = (study.user_attrs.get(SPEC_ATTR) or {}).get("artifacts", {}).get("path")
        if path and path not in paths:
            paths.append(path)
    if len(paths) > 1:
        print(f"note: the studies keep artifacts in {len(paths)} places; showing {paths[0]} "
              "(--artifact-dir picks another)", flush=True)
    return paths[0] if paths else "artifacts"


def check_port(host: str, port: int) -> None:
    """A port another process holds, or an address not this machine's, is one line (exit 2)
    before the server starts: the web server would fail after its banner, with exit 1."""
    try:
        with socket.create_server((host, port)):  # SO_REUSEADDR, as the web server binds
            pass
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise UsageError(f"cannot listen on {host}:{port}: {reason} (--host, --port)") from None


def serve(storage_url: str | None, host: str = "127.0.0.1", port: int = 8080,
          artifact_dir: str | None = None) -> None:
    """Serve until interrupted. Binds 127.0.0.1 unless told otherwise."""
    from optuna_dashboard import run_server

    storage = open_storage(storage_url, heartbeat_interval=None, must_exist=True)
    store = open_artifact_store(artifact_dir or stored_artifact_dir(storage))
    check_port(host, port)
    print(f"optuna-dashboard for {mask(storage.url)} on http://{host}:{port}/", flush=True)
    run_server(storage, host=host, port=port, artifact_store=store)
