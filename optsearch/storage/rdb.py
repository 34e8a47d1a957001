"""Storage URLs: the default, passwords (percent-encoded, or from a secret file), and Optuna RDB
storages tuned per backend.

SQLite gets a long busy timeout and WAL journaling, so one worker and the dashboard can share the
file. PostgreSQL gets pre-ping (connections dropped by the server are replaced). Both get Optuna's
heartbeat, whose stale-trial callback re-queues a dead worker's trial with the same parameters.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import time
import warnings
from urllib.parse import quote

import grpc
import optuna
import sqlalchemy
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from sqlalchemy.engine import make_url

from optsearch.errors import StorageError, StorageUnreachable
from optsearch.storage.masking import encode_password, mask_url, remember, split_userinfo
from optsearch.storage.proxy import is_grpc_url, open_grpc_storage
from optsearch.storage.requeue import RetryWithoutRecord

DEFAULT_URL = "sqlite:///optsearch.db"
ENV_VAR = "OPTSEARCH_STORAGE"
PASSWORD_FILE_VAR = "OPTSEARCH_STORAGE_PASSWORD_FILE"
HEARTBEAT_INTERVAL = 60  # seconds; trials last minutes
GRACE_PERIOD = 300  # a trial without heartbeat for this long is failed and re-queued
MAX_RETRY = 3
SQLITE_BUSY_TIMEOUT = 60
SCHEMA_RACE_ATTEMPTS = 8  # opens retried while workers started together create the tables

# Heartbeat and the stale-trial callback are "experimental" in Optuna; we rely on them on purpose.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


logger = logging.getLogger(__name__)
# What a dropped or restarted database connection raises through Optuna's RDB storage (and
# through the storage proxy: a gRPC error, the proxy or its database being away).
DATABASE_ERRORS = (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError, grpc.RpcError)




class ResilientRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDBStorage whose heartbeat survives a dropped database connection.

    Optuna records heartbeats from a thread that ends at the first exception; after that the
    running trial looks dead and would be failed while it is still measuring. Here a failed beat is
    retried on a fresh connection (pool pre-ping) and, at worst, skipped until the next interval.
    """

    def record_heartbeat(self, trial_id: int) -> None:
        for attempt in range(3):
            try:
                return super().record_heartbeat(trial_id)
            except DATABASE_ERRORS as error:
                logger.warning("heartbeat of trial %d failed (%s); retrying", trial_id,
                               type(error).__name__)
                self.reset_session()
                time.sleep(0.5 * (attempt + 1))
        return None

    def running_with_heartbeat(self, study_id: int) -> set[int]:
        """The study's RUNNING trials whose worker recorded a beat, ever (one query, asked by
        every waiting worker: `recovery.fail_orphans`)."""
        beat, trial = models.TrialHeartbeatModel, models.TrialModel
        with _create_scoped_session(self.scoped_session) as session:
            rows = (session.query(beat.trial_id).join(trial, trial.trial_id == beat.trial_id)
                    .filter(trial.study_id == study_id,
                            trial.state == optuna.trial.TrialState.RUNNING).all())
        return {trial_id for (trial_id,) in rows}

    def reset_session(self) -> None:
        """Drop this thread's session: after a dropped connection it refuses all further use
        ("Can't reconnect until invalid transaction is rolled back")."""
        try:
            self.scoped_session.remove()
        except DATABASE_ERRORS:
            pass


def resolve_url(url: str | None) -> str:
    """The URL given, else $OPTSEARCH_STORAGE, else sqlite:///optsearch.db in the working dir."""
    return url or os.environ.get(ENV_VAR) or DEFAULT_URL


def mask(url: str) -> str:
    """The URL with its password replaced by ***, for every line we print."""
    return mask_url(url)


def _with_password_file(url: str) -> str:
    """Put the password of $OPTSEARCH_STORAGE_PASSWORD_FILE into a URL that has none (a Docker or
    Kubernetes secret: the password never sits in an environment variable)."""
    path = os.environ.get(PASSWORD_FILE_VAR)
    parts = split_userinfo(url)
    if not path or parts is None or parts[2] is not None:
        return url
    try:
        password = open(path, encoding="utf-8").read().strip()
    except OSError as error:
        raise StorageError(f"cannot read ${PASSWORD_FILE_VAR} {path}: {error.strerror}") from None
    remember(password)
    head, user, _, rest = parts
    return f"{head}{user}:{quote(password, safe='')}@{rest}"


def _engine_kwargs(url: sqlalchemy.URL) -> dict:
    if url.get_backend_name() == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
    return {"pool_pre_ping": True, "pool_recycle": 3600}


def _enable_wal(url: sqlalchemy.URL) -> None:
    """WAL journaling lets readers (the dashboard) and one writer work at once; it persists."""
    if not url.database or url.database == ":memory:":
        return
    path = os.path.abspath(url.database)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise StorageError(f"cannot open storage {url}: folder {folder} does not exist")
    if (os.path.exists(path) and not os.access(path, os.W_OK)) or not os.access(folder, os.W_OK):
        what = f"the SQLite file {path}" if os.path.exists(path) else f"its folder {folder}"
        raise StorageError(f"cannot open storage {url}: {what} is read-only (SQLite writes beside "
                           "its file; copy it somewhere writable)")
    def switch() -> None:
        with sqlite3.connect(url.database, timeout=SQLITE_BUSY_TIMEOUT) as connection:
            connection.execute("PRAGMA journal_mode=WAL")

    _retry_races(switch, sqlite3.OperationalError)  # workers started together all switch it


OPTUNA_TABLES = {"studies", "trials", "version_info", "alembic_version"}  # some of Optuna's schema


def _refuse_foreign(url: str, parsed: sqlalchemy.URL) -> None:
    """A database that holds tables but none of Optuna's belongs to something else (a typo in
    --storage naming an app's database): opening it would add Optuna's tables to it (and switch a
    SQLite file to WAL), so nothing is written. An empty database, or a PostgreSQL one a study is
    created in, is Optuna's to set up."""
    if parsed.get_backend_name() == "sqlite" and not (
            parsed.database and os.path.isfile(parsed.database) and os.path.getsize(parsed.database)):
        return
    engine = sqlalchemy.create_engine(url, **_engine_kwargs(parsed))
    try:  # (another process may be creating Optuna's tables in it right now: any one will do)
        tables = _retry_races(lambda: sqlalchemy.inspect(engine).get_table_names(),
                              sqlalchemy.exc.DBAPIError)
    finally:
        engine.dispose()
    if tables and not OPTUNA_TABLES & set(tables):
        shown = ", ".join(sorted(tables)[:3]) + (", ..." if len(tables) > 3 else "")
        raise StorageError(f"{mask(url)} is not an optsearch storage: its database holds other "
                           f"tables ({shown}) and none of Optuna's; nothing was written (check "
                           f"--storage or ${ENV_VAR})")


def _sqlite_exists(url: sqlalchemy.URL) -> bool:
    return not url.database or url.database == ":memory:" or os.path.isfile(url.database)


def _heartbeat_settings(interval: int | None, grace_period: int | None) -> dict:
    """Optuna's heartbeat keywords (RDBStorage's names; the proxy's client takes the same): a beat
    every `interval` seconds, a trial silent for the grace period failed and re-queued."""
    if not interval:
        return {}
    warnings.filterwarnings("ignore", "RetryHeartbeatStaleTrialCallback is experimental",
                            optuna.exceptions.ExperimentalWarning)
    return dict(heartbeat_interval=interval, grace_period=grace_period or interval * 5,
                heartbeat_stale_trial_callback=RetryWithoutRecord(max_retry=MAX_RETRY))


# What a database that is down, starting or out of reach answers (psycopg): a command
# that may work in a minute, unlike a wrong URL, password or database name.
NOT_ANSWERING = ("Connection refused", "timeout expired", "Connection timed out", "No route to host",
                 "the database system is starting up", "the database system is shutting down",
                 "server closed the connection unexpectedly")

def _open_rdb(url: str, parsed, heartbeat: dict) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage, opened again when another process was creating the same tables at
    that moment: on a fresh database, workers started together all create them, and PostgreSQL's
    CREATE TABLE IF NOT EXISTS fails against a concurrent one ('duplicate key value violates
    unique constraint "pg_type_typname_nsp_index"'; SQLite: both stamp Alembic's version row).
    Measured: 5 of 6 `study create`s started at once on a new PostgreSQL database failed with
    exit 2 before this, and 1-2 of 8 on a new SQLite file; later, once in a loaded suite, one of 8
    on a new SQLite file with "database is locked"."""
    return _retry_races(
        lambda: ResilientRDBStorage(url, engine_kwargs=_engine_kwargs(parsed), **heartbeat),
        sqlalchemy.exc.DBAPIError)


# What another process creating the same tables (or switching the file to WAL) makes an open
# answer: PostgreSQL's concurrent CREATE TABLE, SQLite's Alembic version row, and SQLite's busy
# handler giving up at once where waiting could deadlock (seen once in 8 new-file opens).
SCHEMA_RACES = ("duplicate key value", "already exists", "UNIQUE constraint failed",
                "database is locked")


def _retry_races(action, errors: type[Exception]):
    """`action()`, again after a short random pause while it fails with a schema race."""
    for attempt in range(SCHEMA_RACE_ATTEMPTS):
        try:
            return action()
        except errors as error:
            text = str(getattr(error, "orig", None) or error)
            if not any(sign in text for sign in SCHEMA_RACES) or attempt == SCHEMA_RACE_ATTEMPTS - 1:
                raise
            logger.debug("storage being created by another process meanwhile: again")
            time.sleep(random.uniform(0.1, 0.5) * (attempt + 1))
    raise AssertionError("unreachable")


def open_storage(url: str | None = None, heartbeat_interval: int | None = HEARTBEAT_INTERVAL,
                 grace_period: int | None = GRACE_PERIOD,
                 must_exist: bool = False) -> optuna.storages.RDBStorage:
    """Open (creating tables when needed) the Optuna RDB storage at `url`, or the storage proxy
    at a grpc://host:port URL (storage/proxy.py).

    `must_exist`: a SQLite file that is not there is an error, not a new empty database (for
    commands that only read or join studies: a typo must not create a storage).
    """
    url = resolve_url(url)
    heartbeat = _heartbeat_settings(heartbeat_interval, grace_period)
    if is_grpc_url(url):
        return open_grpc_storage(url, **heartbeat)
    mask_url(url)  # remembers the password, so no error text can show it
    url = _with_password_file(encode_password(url))
    try:
        parsed = make_url(url)
    except Exception:
        raise StorageError(f"malformed storage URL {mask(url)!r}: expected e.g. "
                           "sqlite:///optsearch.db or postgresql+psycopg://user:pass@host/db") from None
    if parsed.drivername in ("postgresql", "postgres"):  # psycopg (3) is the driver we install;
        # postgres:// is what cloud databases hand out (SQLAlchemy dropped that name)
        parsed = parsed.set(drivername="postgresql+psycopg")
        url = parsed.render_as_string(hide_password=False)
    try:
        sqlite = parsed.get_backend_name() == "sqlite"
        if sqlite and must_exist and not _sqlite_exists(parsed):
            path = os.path.abspath(parsed.database or "")
            raise StorageError(f"no storage at {path}: the SQLite file does not exist (check "
                               f"--storage or ${ENV_VAR}; `optsearch study create` makes one)")
        if must_exist or sqlite:  # a read command, or one SQLite file: never another app's
            _refuse_foreign(url, parsed)
        if sqlite:
            _enable_wal(parsed)
        return _open_rdb(url, parsed, heartbeat)
    except StorageError:
        raise
    except Exception as error:  # driver errors: unreachable host, bad password, no database
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()
        reason_text = reason[0] if reason else type(error).__name__
        if any(sign in reason_text for sign in NOT_ANSWERING):
            raise StorageUnreachable(f"cannot reach storage {mask(url)}: {reason_text} (exit 75: "
                                     "try again once it is up)") from None
        if isinstance(error, ImportError) or "Failed to import DB access module" in reason_text:
            reason_text = (f"no driver for {parsed.drivername} here: optsearch installs "
                           "SQLite's and psycopg (postgresql+psycopg://, or postgresql://)")
        elif "Can't load plugin" in reason_text:  # SQLAlchemy knows no such database
            reason_text = (f"{parsed.drivername}:// is not a database SQLAlchemy knows: give "
                           "sqlite:///FILE, postgresql://..., or a storage proxy's grpc://host:port")
        raise StorageError(f"cannot open storage {mask(url)}: {reason_text}") from None
