"""Optuna's gRPC storage proxy: one process holds the database connections, workers talk gRPC.

`optsearch storage-proxy --storage URL` serves an RDB storage (`serve`); every command takes
`grpc://host:port` as its storage (`open_grpc_storage`). The database URL and its password stay on
the proxy's side: a worker's URL names only the proxy.

Optuna's `GrpcStorageProxy` has no heartbeat, so a dead worker's trial would stay RUNNING for good.
`HeartbeatGrpcStorage` adds one through the storage itself: a worker's beat is a trial system
attribute holding its wall-clock time, and a trial whose beat is older than the grace period is
stale, failed and re-queued by Optuna's own `fail_stale_trials` and stale-trial callback, as on a
direct URL. Beats are compared across machines, so their clocks must agree to well within the
grace period (five minutes by default; NTP keeps cluster nodes within milliseconds).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import grpc
import optuna
from optuna.storages import GrpcStorageProxy
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

from optsearch.errors import StorageError, StorageUnreachable

SCHEME = "grpc"
DEFAULT_PORT = 13000
BEAT_ATTR = "optsearch:heartbeat"
CONNECT_TIMEOUT = 10.0  # seconds to reach the proxy before a command gives up with one line
logger = logging.getLogger(__name__)


def is_grpc_url(url: str | None) -> bool:
    return bool(url) and url.startswith(f"{SCHEME}://")


def host_and_port(url: str) -> tuple[str, int]:
    """grpc://host:port -> (host, port); the port defaults to Optuna's 13000."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise StorageError("a grpc:// storage URL names only the proxy (grpc://host:port): the "
                           "database's user and password stay with `optsearch storage-proxy`")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        port = None
    if parts.scheme != SCHEME or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise StorageError(f"malformed storage URL {url!r}: expected grpc://host:port (the proxy "
                           "holds the database URL and its password)")
    return parts.hostname, port


class HeartbeatGrpcStorage(GrpcStorageProxy, BaseHeartbeat):
    """Optuna's gRPC client with a heartbeat kept in a trial system attribute (module docstring)."""

    def __init__(self, *, host: str, port: int, heartbeat_interval: int | None = None,
                 grace_period: int | None = None,
                 heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None):
        """The heartbeat keywords are RDBStorage's (storage/rdb.py builds them for both)."""
        super().__init__(host=host, port=port)
        self.url = f"{SCHEME}://{host}:{port}"
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, BEAT_ATTR, time.time())
        except (grpc.RpcError, optuna.exceptions.UpdateFinishedTrialError) as error:
            # a missed beat is not fatal: the grace period spans several (the RDB heartbeat's rule)
            logger.warning("heartbeat of trial %d failed (%s)", trial_id, type(error).__name__)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        if not self.grace_period:
            return []
        deadline = time.time() - self.grace_period
        return [trial._trial_id for trial in self.get_all_trials(study_id, deepcopy=False,
                                                                 states=(TrialState.RUNNING,))
                if trial.system_attrs.get(BEAT_ATTR, deadline + 1) < deadline]

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def running_with_heartbeat(self, study_id: int) -> set[int]:
        """The study's RUNNING trials whose worker recorded a beat, ever (`recovery.fail_orphans`)."""
        return {trial._trial_id for trial in self.get_all_trials(study_id, deepcopy=False,
                                                                 states=(TrialState.RUNNING,))
                if BEAT_ATTR in trial.system_attrs}

    def get_heartbeat_stale_trial_callback(self):
        return self.stale_trial_callback

    def reset_session(self) -> None:
        """Nothing to drop: gRPC reconnects its channel by itself (RDB storages drop a session)."""


def open_grpc_storage(url: str, **heartbeat) -> HeartbeatGrpcStorage:
    """The proxy at `url`, once it answers (a proxy that is not there is one line, not a hang);
    `heartbeat`: RDBStorage's heartbeat keywords, or none."""
    host, port = host_and_port(url)
    storage = HeartbeatGrpcStorage(host=host, port=port, **heartbeat)
    try:
        storage.wait_server_ready(timeout=CONNECT_TIMEOUT)
    except ConnectionError:
        storage.close()
        raise StorageUnreachable(f"cannot reach the storage proxy at {storage.url} within "
                                 f"{CONNECT_TIMEOUT:.0f} s (is `optsearch storage-proxy` running "
                                 "there? exit 75: try again once it is up)") from None
    return storage


def serve(storage: optuna.storages.BaseStorage, shown_url: str, host: str, port: int,
          threads: int = 32) -> None:
    """Serve `storage` on host:port until interrupted. Optuna's cache sits in front of the RDB
    storage, as its docs ask: finished trials are read from the database once."""
    from concurrent.futures import ThreadPoolExecutor

    from optuna.storages._cached_storage import _CachedStorage
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    # Optuna's make_server, but a port another process holds is an error: gRPC's default
    # SO_REUSEPORT would let two proxies share it and split the workers between them.
    server = grpc.server(ThreadPoolExecutor(max_workers=threads), options=[("grpc.so_reuseport", 0)])
    api_pb2_grpc.add_StorageServiceServicer_to_server(
        OptunaStorageProxyService(_CachedStorage(storage)), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise StorageError(f"cannot listen on {host}:{port}: the port is in use or the address "
                           "is not this machine's")
    server.start()
    print(f"storage proxy for {shown_url} listening on grpc://{host}:{port} "
          f"({threads} threads)", flush=True)
    try:
        server.wait_for_termination()
    finally:
        server.stop(grace=2)
