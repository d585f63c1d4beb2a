"""The node's SQLite database: one file under ``storage.root``, WAL journal, full sync.

Every thread opens its own connection (``sqlite3`` connections are not shared between
threads); WAL lets the SCP's writers, the assembler and the workers proceed concurrently. Job
state commits with ``synchronous=FULL`` (durable at once). The spool's index commits with
``NORMAL`` (consistent, but the last commits may roll back after a power cut): the fsynced
spool file is the durable record of an acknowledged instance, and :meth:`Spool.reconcile`
re-indexes any file whose row was lost when the node starts.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
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
"""


def database_path(root: Path) -> Path:
    """Where the node's database lives under ``storage.root``."""
    return Path(root) / "node.sqlite"


def connect(root: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """A new connection to the node's database (created with its schema when missing)."""
    path = database_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                                 check_same_thread=False)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
    connection.execute(f"PRAGMA synchronous={synchronous}")
    connection.execute("PRAGMA busy_timeout=30000")
    connection.executescript(SCHEMA)
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
