"""The node's SQLite database: one file under ``storage.root``, WAL journal, full sync.

Every thread opens its own connection (``sqlite3`` connections are not shared between
threads), through one :class:`Connections` per component; WAL lets the SCP's writers, the
assembler and the workers proceed concurrently. Job state commits with ``synchronous=FULL``
(durable at once). The spool's index commits with ``NORMAL`` (consistent, but the last commits
may roll back after a power cut): the fsynced spool file is the durable record of an
acknowledged instance, and :meth:`Spool.reconcile` re-indexes any file whose row was lost when
the node starts.

The schema is versioned with ``PRAGMA user_version``: :data:`MIGRATIONS` holds one forward
migration per version, and opening the database applies the missing ones in order, each in its
own transaction, so that a database written by an earlier release is upgraded in place. A
database written by a newer release (a version this code does not know) is refused rather than
misread.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import config

log = logging.getLogger(__name__)

#: Forward migrations: ``MIGRATIONS[n - 1]`` takes the schema from version ``n - 1`` to ``n``.
#: Append to this list, never edit a released entry: databases in the field have applied it.
MIGRATIONS: tuple[str, ...] = (
    # 1: the schema of the releases before versioning (which left user_version at 0). It keeps
    # IF NOT EXISTS so that such a database, which has these tables already, is adopted as is.
    """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    received_at REAL NOT NULL,
    calling_ae TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    frame_of_reference_uid TEXT NOT NULL,
    role TEXT NOT NULL,
    header TEXT NOT NULL,
    expected INTEGER,
    instances INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    complete_generation INTEGER
);
CREATE INDEX IF NOT EXISTS series_study ON series (study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    input_key TEXT,
    t1w_series_uid TEXT,
    t2w_series_uid TEXT,
    route TEXT,
    model TEXT,
    destinations TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    sending_since REAL,
    keyed_at REAL,
    result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_uid);
CREATE TABLE IF NOT EXISTS transitions (
    job_id INTEGER NOT NULL,
    at REAL NOT NULL,
    state TEXT NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS transitions_job ON transitions (job_id);
CREATE TABLE IF NOT EXISTS outputs (
    job_id INTEGER NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (job_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (job_id, destination, sop_instance_uid)
);
""",
    # 2: the SOP Class and Transfer Syntax of each output, so that sending need not re-read the
    # files, and its place in the sending order (images before what references them); NULL
    # for outputs recorded before.
    """
ALTER TABLE outputs ADD COLUMN sop_class_uid TEXT;
ALTER TABLE outputs ADD COLUMN transfer_syntax_uid TEXT;
ALTER TABLE outputs ADD COLUMN position INTEGER;
""",
    # 3: a job's exact inputs, fixed when it becomes ready: {"t1w": [[SOP Instance UID,
    # SHA-256], ...], "t2w": [...]}; its worker processes those bytes or none. NULL before.
    """
ALTER TABLE jobs ADD COLUMN inputs TEXT;
""",
    # 4: a job an administrator forced through screening (vcemri jobs retry --force).
    """
ALTER TABLE jobs ADD COLUMN forced INTEGER NOT NULL DEFAULT 0;
""",
    # 5: each instance's slice position along the normal of its plane (mm; NULL for
    # multi-frame instances and rows indexed before), and why a series that went quiet is
    # not yet whole (a gap between slice positions, fewer instances than it announces):
    # it waits for the rest, up to assembly.incomplete_wait_s, then its study fails.
    """
ALTER TABLE instances ADD COLUMN position REAL;
ALTER TABLE series ADD COLUMN problem TEXT;
""",
    # 6: earlier versions of an instance resent with other bytes under the same SOP Instance
    # UID. The ``instances`` row is the current version (what the next job uses); each
    # version it replaced keeps its file and a row here, so that a job created with it still
    # processes exactly its inputs. Retention deletes them with the instance.
    """
CREATE TABLE IF NOT EXISTS instance_versions (
    sop_instance_uid TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    received_at REAL NOT NULL,
    replaced_at REAL NOT NULL,
    PRIMARY KEY (sop_instance_uid, sha256)
);
""",
    # 7: storage commitment (PS3.4 Annex J) asked of a destination for a job's outputs: one
    # row per N-ACTION transaction, its state (pending, committed, failed, expired) and, when
    # the peer reported failures, the uncommitted objects with their reasons (JSON).
    """
CREATE TABLE IF NOT EXISTS commitments (
    transaction_uid TEXT PRIMARY KEY,
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    called_ae TEXT NOT NULL,
    count INTEGER NOT NULL,
    requested_at REAL NOT NULL,
    state TEXT NOT NULL,
    reported_at REAL,
    failures TEXT
);
CREATE INDEX IF NOT EXISTS commitments_job ON commitments (job_id, destination);
""",
)

#: The newest schema version this code knows (and creates).
SCHEMA_VERSION = len(MIGRATIONS)

SYNCHRONOUS = ("FULL", "NORMAL")


def database_path(root: Path) -> Path:
    """Where the node's database lives under ``storage.root``."""
    return Path(root) / "node.sqlite"


def connect(root: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """A new connection to the node's database, created or upgraded to :data:`SCHEMA_VERSION`
    first (see :func:`migrate`). Raises :class:`config.StorageError` for a database written by a
    newer vcemri, or one that cannot be upgraded."""
    if synchronous not in SYNCHRONOUS:
        raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
    path = database_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                                 check_same_thread=False)
    try:
        connection.row_factory = sqlite3.Row
        _enable_wal(connection)
        connection.execute(f"PRAGMA synchronous={synchronous}")
        connection.execute("PRAGMA busy_timeout=30000")
        migrate(connection, path)
    except BaseException:
        connection.close()
        raise
    return connection


def _enable_wal(connection: sqlite3.Connection, wait_s: float = 30.0) -> None:
    """Put the database in WAL mode (persistent: a no-op once any connection has done it).

    Switching a new database to WAL while another process does the same can fail at once
    with "database is locked": the switch upgrades a read lock, and SQLite answers busy there
    without waiting (a wait could deadlock). So it is retried, for as long as a busy
    connection would wait."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL").fetchone()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(random.uniform(0.005, 0.05))


def migrate(connection: sqlite3.Connection, path: Path) -> list[int]:
    """Bring the database to :data:`SCHEMA_VERSION`; returns the versions this call applied
    (none when another connection, thread or process did it first).

    Each migration runs in its own ``BEGIN IMMEDIATE`` transaction together with the
    ``user_version`` it reaches, so a crash leaves the database at one version or the next,
    never between. The version is read again once the write lock is held: several processes
    opening a new database at once wait for each other and only the first applies anything."""
    applied: list[int] = []
    version = _user_version(connection)
    _refuse_newer(path, version)
    while version < SCHEMA_VERSION:
        try:
            with transaction(connection):
                version = _user_version(connection)
                _refuse_newer(path, version)
                if version >= SCHEMA_VERSION:
                    break
                for statement in _statements(MIGRATIONS[version]):
                    connection.execute(statement)
                # PRAGMA takes no parameters; the value is an int computed here
                connection.execute(f"PRAGMA user_version = {version + 1}")
        except sqlite3.Error as exc:
            raise config.StorageError(
                f"cannot upgrade the node database {path} from schema version {version} to "
                f"{version + 1}: {exc}",
                hint="the failed step was rolled back; check that the disk is writable and "
                     "not full and that no other program holds the database") from exc
        version += 1
        applied.append(version)
        log.info("node database %s upgraded to schema version %d", path, version)
    return applied


def _user_version(connection: sqlite3.Connection) -> int:
    return int(connection.execute("PRAGMA user_version").fetchone()[0])


def _refuse_newer(path: Path, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise config.StorageError(
            f"the node database {path} has schema version {version}, but this vcemri knows "
            f"versions up to {SCHEMA_VERSION}: it was written by a newer vcemri",
            hint="upgrade vcemri to the release that wrote it, or point storage.root at "
                 "another directory")


def _statements(script: str) -> Iterator[str]:
    """The statements of a migration script, one at a time. (``executescript`` would commit
    the open transaction first, so each statement is executed on its own.)"""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):  # a ';' inside a literal or trigger waits
            if pending.strip(" \t\n;"):
                yield pending.strip()
            pending = ""
    if pending.strip(" \t\n;"):
        raise ValueError(f"incomplete SQL statement in a migration: {pending.strip()!r}")


class Connections:
    """One connection to the node's database per thread, opened on first use.

    Each component (job queue, spool, assembler) keeps one; ``synchronous`` is ``FULL`` for
    state that must survive a power cut, ``NORMAL`` where a durable file backs the row."""

    def __init__(self, root: Path, synchronous: str = "FULL") -> None:
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.root = Path(root)
        self.synchronous = synchronous
        self._local = threading.local()

    def get(self) -> sqlite3.Connection:
        """This thread's connection (see :func:`connect` for what opening one may raise)."""
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = connect(self.root, self.synchronous)
        return connection


@contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` (the write lock at once), ``COMMIT`` at the end of the block, and
    ``ROLLBACK`` when it raises, so that no error leaves the connection inside a transaction."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
