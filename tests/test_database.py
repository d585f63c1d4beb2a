"""The node database's versioned schema: upgrading a database from the release before
versioning, refusing one from a newer release, concurrent first opens, and the per-thread
connection helper."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from support.node import write_config

import config
import dicom_node
from dicom_node import database
from dicom_node.jobs import JobQueue
from synthesis import WrittenObject

#: The schema of the release before versioning, verbatim: it ran ``executescript`` of this on
#: every connection and never set ``user_version`` (so its databases read 0).
PREVIOUS_SCHEMA = """
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

STUDY, T1W, T2W = "1.2.3.1", "1.2.3.1.1", "1.2.3.1.2"


def _previous_release_database(root: Path) -> Path:
    """``node.sqlite`` as the release before versioning left it: its schema, WAL, and a done
    job with its transitions, outputs and deliveries, a waiting job, and a spooled series."""
    root.mkdir(parents=True, exist_ok=True)
    path = database.database_path(root)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(PREVIOUS_SCHEMA)
        db.execute(
            "INSERT INTO jobs (study_uid, state, reason, input_key, t1w_series_uid, "
            "t2w_series_uid, route, model, destinations, attempts, next_attempt_at, "
            "created_at, updated_at, sending_since, keyed_at, result) "
            "VALUES (?, 'done', NULL, 'key1', ?, ?, 'default', 'default', ?, 1, 0, 100, 200, "
            "150, 90, ?)",
            (STUDY, T1W, T2W, json.dumps(["tps"]), json.dumps({"sent": 2})))
        db.execute("INSERT INTO jobs (study_uid, state, reason, created_at, updated_at) "
                   "VALUES ('1.2.3.2', 'waiting', 'T2w series not received', 300, 300)")
        db.executemany("INSERT INTO transitions VALUES (?, ?, ?, ?)",
                       [(1, 100, "ready", "T1w and T2w complete; route default"),
                        (1, 120, "running", None), (1, 150, "sending", None),
                        (1, 200, "done", None),
                        (2, 300, "waiting", "T2w series not received")])
        db.executemany("INSERT INTO outputs VALUES (?, ?, ?)",
                       [(1, "1.2.3.9.1", str(root / "out" / "a.dcm")),
                        (1, "1.2.3.9.2", str(root / "out" / "b.dcm"))])
        db.executemany("INSERT INTO deliveries VALUES (?, ?, ?, ?)",
                       [(1, "tps", "1.2.3.9.1", 190), (1, "tps", "1.2.3.9.2", 191)])
        db.execute("INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   ("1.2.3.1.1.1", T1W, STUDY, "1.2.840.10008.5.1.4.1.1.4",
                    "1.2.840.10008.1.2.1", str(root / "spool" / STUDY / T1W / "1.2.3.1.1.1.dcm"),
                    "0" * 64, 1234, 50, "MR"))
        db.execute("INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (T1W, STUDY, "P1", "1.2.3.4", "t1w", json.dumps({"Modality": "MR"}), None,
                    1, 1, 50, 50, 1))
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    finally:
        db.close()
    return path


def _raw(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def _user_version(path: Path) -> int:
    return int(_raw(path, "PRAGMA user_version")[0][0])


def _schema(path: Path) -> list[tuple[Any, ...]]:
    return _raw(path, "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name")


def _contents(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    tables = ("jobs", "transitions", "outputs", "deliveries", "instances", "series")
    return {t: _raw(path, f"SELECT * FROM {t} ORDER BY rowid") for t in tables}


def _settings(tmp_path: Path, root: Path) -> config.Settings:
    return config.load_settings(write_config(tmp_path / "node.yaml", root, Path("builtin")))


def test_a_database_of_the_previous_release_is_upgraded_in_place(tmp_path: Path) -> None:
    root = tmp_path / "root"
    path = _previous_release_database(root)

    queue = JobQueue(root)
    done, waiting = queue.get(1), queue.get(2)
    assert _user_version(path) == database.SCHEMA_VERSION == len(database.MIGRATIONS) == 7
    assert (done.state, done.study_uid, done.t1w_series_uid, done.t2w_series_uid) == (
        "done", STUDY, T1W, T2W)
    assert done.destinations == ["tps"] and done.result == {"sent": 2}
    assert done.inputs == {} and not done.forced  # columns of versions 3 and 4
    assert (done.input_key, done.route, done.sending_since, done.keyed_at) == (
        "key1", "default", 150, 90)
    assert (waiting.state, waiting.reason) == ("waiting", "T2w series not received")
    assert [j.id for j in queue.list()] == [2, 1]
    assert [t["state"] for t in queue.transitions(1)] == ["ready", "running", "sending", "done"]
    assert queue.outputs(1) == [dicom_node.Output("1.2.3.9.1", root / "out" / "a.dcm"),
                                dicom_node.Output("1.2.3.9.2", root / "out" / "b.dcm")]
    assert queue.delivered(1, "tps") == {"1.2.3.9.1", "1.2.3.9.2"}

    spool = dicom_node.Spool(_settings(tmp_path, root))
    assert spool.series_files(T1W) == [root / "spool" / STUDY / T1W / "1.2.3.1.1.1.dcm"]
    # version 5: slice positions unknown for instances indexed before, no series problem
    assert _raw(path, "SELECT DISTINCT position FROM instances") == [(None,)]
    assert _raw(path, "SELECT DISTINCT problem FROM series") == [(None,)]
    # version 6: no earlier versions of any instance
    assert _raw(path, "SELECT count(*) FROM instance_versions") == [(0,)]
    # version 7: no storage commitment asked yet
    assert _raw(path, "SELECT count(*) FROM commitments") == [(0,)]

    columns = [r[1] for r in _raw(path, "PRAGMA table_info(outputs)")]
    assert columns == ["job_id", "sop_instance_uid", "path", "sop_class_uid",
                       "transfer_syntax_uid", "position"]
    assert _raw(path, "SELECT sop_class_uid, transfer_syntax_uid, position FROM outputs") == [
        (None, None, None), (None, None, None)]
    # new outputs keep their SOP class, transfer syntax and sending order on the upgraded table
    written = [WrittenObject(f"1.2.3.9.{k}", "1.2.840.10008.5.1.4.1.1.4",
                             "1.2.840.10008.1.2.1", "1.2.3.8", "MR", root / "out" / name)
               for k, name in ((3, "z.dcm"), (4, "c.dcm"))]
    queue.record_outputs(2, written)
    assert queue.outputs(2) == [dicom_node.Output(o.sop_instance_uid, o.path, o.sop_class_uid,
                                                  o.transfer_syntax_uid) for o in written]
    # an upgraded database ends with exactly the schema of a new one
    database.connect(tmp_path / "fresh").close()
    assert _schema(path) == _schema(database.database_path(tmp_path / "fresh"))


def test_opening_an_upgraded_database_again_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    path = _previous_release_database(root)
    first = database.connect(root)
    first.close()
    schema, contents = _schema(path), _contents(path)

    again = database.connect(root)
    try:
        assert database.migrate(again, path) == []
    finally:
        again.close()
    JobQueue(root).list()
    dicom_node.Spool(_settings(tmp_path, root))
    assert _user_version(path) == database.SCHEMA_VERSION
    assert _schema(path) == schema and _contents(path) == contents


def test_a_database_from_a_newer_vcemri_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    database.connect(root).close()
    path = database.database_path(root)
    newer = database.SCHEMA_VERSION + 1
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {newer}")
    db.commit()
    db.close()
    schema = _schema(path)

    with pytest.raises(config.StorageError) as refused:
        database.connect(root)
    assert refused.value.reason == (
        f"the node database {path} has schema version {newer}, but this vcemri knows versions "
        f"up to {database.SCHEMA_VERSION}: it was written by a newer vcemri")
    assert refused.value.hint is not None and "upgrade vcemri" in refused.value.hint
    with pytest.raises(config.StorageError, match="written by a newer vcemri"):
        JobQueue(root).list()
    assert _user_version(path) == newer and _schema(path) == schema


def test_a_failing_migration_leaves_the_database_at_the_version_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    database.connect(root).close()
    path = database.database_path(root)
    broken = "ALTER TABLE jobs ADD COLUMN priority INTEGER; ALTER TABLE nowhere ADD COLUMN x;"

    newest = len(database.MIGRATIONS)
    monkeypatch.setattr(database, "MIGRATIONS", (*database.MIGRATIONS, broken))
    monkeypatch.setattr(database, "SCHEMA_VERSION", newest + 1)

    with pytest.raises(config.StorageError,
                       match=rf"from schema version {newest} to {newest + 1}: no such table"):
        database.connect(root)
    assert _user_version(path) == newest
    assert "priority" not in [r[1] for r in _raw(path, "PRAGMA table_info(jobs)")]


def _open_at_once(root: Path, barrier: Any, results: Any) -> None:
    """In a child process: wait for the others, open the database, report what it applied."""
    applied: list[int] = []
    original = database.migrate

    def recording(connection: sqlite3.Connection, path: Path) -> list[int]:
        done = original(connection, path)
        applied.extend(done)
        return done

    database.migrate = recording  # type: ignore[assignment]
    try:
        barrier.wait(timeout=30)
        connection = database.connect(root)
        connection.execute("SELECT count(*) FROM outputs").fetchone()
        connection.close()
        results.put(("ok", applied))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails
        results.put(("error", repr(exc)))


def test_processes_opening_a_new_database_at_once_apply_the_schema_once(
        tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    for attempt in range(5):
        root = tmp_path / f"root{attempt}"
        barrier, results = context.Barrier(4), context.Queue()
        children = [context.Process(target=_open_at_once, args=(root, barrier, results))
                    for _ in range(4)]
        for child in children:
            child.start()
        reports = [results.get(timeout=60) for _ in children]
        for child in children:
            child.join(timeout=30)
            assert child.exitcode == 0
        assert [r for r in reports if r[0] != "ok"] == []
        applied = sorted(v for _, versions in reports for v in versions)
        assert applied == list(range(1, database.SCHEMA_VERSION + 1))
        assert _user_version(database.database_path(root)) == database.SCHEMA_VERSION


def test_connections_are_one_per_thread_and_reused_within_it(tmp_path: Path) -> None:
    connections = database.Connections(tmp_path / "root", synchronous="NORMAL")
    main = connections.get()
    assert connections.get() is main
    assert main.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert database.Connections(tmp_path / "root").get().execute(
        "PRAGMA synchronous").fetchone()[0] == 2  # FULL, the default

    seen: dict[str, tuple[sqlite3.Connection, sqlite3.Connection]] = {}
    together = threading.Barrier(2)  # both threads alive at once, so no object is recycled

    def use(name: str) -> None:
        together.wait(timeout=10)
        seen[name] = (connections.get(), connections.get())
        together.wait(timeout=10)

    threads = [threading.Thread(target=use, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    (a1, a2), (b1, b2) = seen["a"], seen["b"]
    assert a1 is a2 and b1 is b2
    assert len({id(main), id(a1), id(b1)}) == 3
    with pytest.raises(ValueError, match="FULL or NORMAL"):
        database.Connections(tmp_path / "root", synchronous="OFF")


def test_migration_scripts_split_into_statements() -> None:
    script = "CREATE TABLE t (a TEXT DEFAULT 'x;y');\nINSERT INTO t VALUES ('1;2');\n"
    assert list(database._statements(script)) == [
        "CREATE TABLE t (a TEXT DEFAULT 'x;y');", "INSERT INTO t VALUES ('1;2');"]
    assert len(list(database._statements(database.MIGRATIONS[0]))) == 11


def test_retry_delays_double_with_jitter_and_never_exceed_the_maximum() -> None:
    import random

    from dicom_node.jobs import backoff_s

    rng = random.Random(0)
    for attempt in range(1, 12):
        delays = [backoff_s(attempt, 2.0, 60.0, rng) for _ in range(200)]
        base = 2.0 * 2 ** (attempt - 1)
        assert max(delays) <= 60.0  # jobs.retry_max_s is a maximum, jitter included
        assert min(delays) >= min(60.0, 0.75 * base)
        if 1.25 * base < 60.0:
            assert max(delays) > 1.1 * base and min(delays) < 0.9 * base  # jittered


def test_commitment_waits_and_an_earlier_run_do_not_lengthen_a_delivery_backoff() -> None:
    """The attempt a failed delivery's backoff is computed from counts the failed attempts
    since the job entered ``sending``: a job that waited five times for a storage commitment
    report, or failed to send before an administrator retried it, backs off from the start."""
    from dicom_node.worker import RETRYING, delivery_attempt

    def step(state: str, reason: str) -> dict[str, object]:
        return {"at": 0.0, "state": state, "reason": reason}

    entered = [step("ready", "T1w and T2w complete"), step("running", "synthesizing"),
               step("sending", "13 objects written")]
    assert delivery_attempt(entered) == 1
    waits = [step("sending", "13 objects delivered; waiting for tps's storage commitment "
                             "report (transaction 1.2.3)") for _ in range(5)]
    failure = step("sending", f"destination tps: connection refused{RETRYING}2 s")
    assert delivery_attempt(entered + waits) == 1
    assert delivery_attempt(entered + waits + [failure]) == 2
    assert delivery_attempt(entered + [failure, step("sending", "resumed"), failure]) == 3
    earlier = entered + [failure, failure, step("failed", "gave up after 60 s"),
                         step("ready", "retried by an administrator"),
                         step("running", "synthesizing"), step("sending", "13 objects written")]
    assert delivery_attempt(earlier) == 1
