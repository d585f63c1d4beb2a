"""The durable job queue (SQLite) behind a narrow interface a Celery backend could replace.

A job is one study on its way through the node::

    waiting -> ready -> running -> sending -> done
                                       \\-> failed | rejected   (from any active state)

``waiting``: the study has arrived in part (its T1w or T2w is missing or incomplete);
``ready``: both series are complete and a route chose the model and destinations; ``running``:
a worker is synthesizing; ``sending``: results are written and being delivered; ``done``;
``failed`` (a reason a person can act on); ``rejected`` (deliberately not processed: screening
refused the study, or no route matches). Every transition is kept with its time and reason.

Interface: :meth:`JobQueue.enqueue`, :meth:`claim`, :meth:`complete` (advance), :meth:`fail`,
:meth:`retry` (later, with backoff), plus :meth:`cancel`, :meth:`requeue`, :meth:`get`,
:meth:`list` and :meth:`recover` (after a restart: interrupted ``running`` jobs become
``ready`` again).
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import config

from .database import Connections, transaction

if TYPE_CHECKING:
    from synthesis import WrittenObject

log = logging.getLogger(__name__)

WAITING, READY, RUNNING, SENDING = "waiting", "ready", "running", "sending"
DONE, FAILED, REJECTED, CANCELLED = "done", "failed", "rejected", "cancelled"
ACTIVE = (WAITING, READY, RUNNING, SENDING)
TERMINAL = (DONE, FAILED, REJECTED, CANCELLED)
STATES = ACTIVE + TERMINAL


@dataclass(frozen=True)
class Job:
    """A job's row, as the CLI and the workers see it."""

    id: int
    study_uid: str
    state: str
    reason: str | None
    input_key: str | None
    t1w_series_uid: str | None
    t2w_series_uid: str | None
    route: str | None
    model: str | None
    destinations: list[str]
    attempts: int
    next_attempt_at: float
    created_at: float
    updated_at: float
    sending_since: float | None
    keyed_at: float | None = None
    result: dict[str, Any] = field(default_factory=dict)
    #: the exact input instances, role -> [(SOP Instance UID, SHA-256)], fixed when the job
    #: became ready (empty for jobs of databases older than schema version 3)
    inputs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    #: an administrator forced it through screening (its objects say so)
    forced: bool = False

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = dict(row)
        values["destinations"] = json.loads(values["destinations"] or "[]")
        values["result"] = json.loads(values["result"] or "{}")
        values["inputs"] = {role: [tuple(pair) for pair in pairs] for role, pairs in
                            json.loads(values["inputs"] or "{}").items()}
        values["forced"] = bool(values.get("forced"))
        return cls(**values)


class Output(NamedTuple):
    """An object a job wrote: its SOP Instance UID and file, and (recorded since schema
    version 2; None before) its SOP Class and Transfer Syntax."""

    sop_instance_uid: str
    path: Path
    sop_class_uid: str | None = None
    transfer_syntax_uid: str | None = None


def output_folder(root: Path, job_id: int) -> Path:
    """Where a job's results are written under ``storage.root``."""
    return Path(root) / "outputs" / f"job-{job_id:06d}"


#: How long a claimed job stays invisible to other workers (longer than any synthesis).
CLAIM_S = 3600.0

#: The reason of a job :meth:`JobQueue.recover` resumed.
RESUMED = "resumed after the node restarted"


class JobChanged(config.VcemriError):
    """The job is no longer in the state the caller expected (e.g. cancelled meanwhile)."""


#: Job columns that hold JSON.
JSON_COLUMNS = ("destinations", "result", "inputs")


def _encoded(values: dict[str, Any]) -> dict[str, Any]:
    """Column values as stored: the JSON columns serialised."""
    return {k: json.dumps(v) if k in JSON_COLUMNS else v for k, v in values.items()}


def backoff_s(attempt: int, initial_s: float, maximum_s: float,
              rng: random.Random | None = None) -> float:
    """Delay before retry ``attempt`` (1-based): doubling from ``initial_s``, with +-25 %
    jitter so that many jobs do not retry in step, never above ``maximum_s`` (the jitter is
    taken before the cap, so the configured maximum holds)."""
    base = initial_s * 2 ** max(0, attempt - 1)
    return min(maximum_s, base * (rng or random).uniform(0.75, 1.25))


class JobQueue:
    """Jobs in the node's SQLite database; safe to use from several threads and processes."""

    def __init__(self, root: Path, audit: config.AuditLog | None = None) -> None:
        self.root = Path(root)
        self.audit = audit
        self._connections = Connections(self.root)
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        return self._connections.get()

    # -- the narrow interface -----------------------------------------------------------------

    def enqueue(self, study_uid: str, *, state: str = WAITING, reason: str | None = None,
                **values: Any) -> Job:
        """A new job for a study, ``waiting`` for its series or already ``ready``."""
        now = time.time()
        values = _encoded(values)
        columns = ["study_uid", "state", "reason", "created_at", "updated_at", *values]
        with self._lock:
            db = self._db()
            with transaction(db):
                cursor = db.execute(
                    f"INSERT INTO jobs ({', '.join(columns)}) "
                    f"VALUES ({', '.join('?' for _ in columns)})",
                    (study_uid, state, reason, now, now, *values.values()))
                job_id = int(cursor.lastrowid or 0)
                db.execute("INSERT INTO transitions VALUES (?, ?, ?, ?)",
                           (job_id, now, state, reason))
        self._audit(job_id, study_uid, state, None, reason)
        return self.get(job_id)

    def claim(self, states: tuple[str, ...] = (READY, SENDING)) -> Job | None:
        """Take the oldest job in ``states`` that is due, marking a ``ready`` one ``running``
        (a ``sending`` one stays ``sending``, its next attempt pushed back while it is held)."""
        now = time.time()
        with self._lock:
            db = self._db()
            with transaction(db):
                # a running job past its claim deadline lost its worker: run it again
                row = db.execute(
                    f"SELECT * FROM jobs WHERE state IN ({', '.join('?' for _ in states)}, ?) "
                    "AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT 1",
                    (*states, RUNNING, now)).fetchone()
                if row is None:
                    return None
                new_state = RUNNING if row["state"] in (READY, RUNNING) else row["state"]
                # a claimed job is invisible to other workers until this deadline
                db.execute("UPDATE jobs SET state = ?, updated_at = ?, next_attempt_at = ?, "
                           "attempts = attempts + ? WHERE id = ?",
                           (new_state, now, now + CLAIM_S, 1 if new_state == RUNNING else 0,
                            row["id"]))
                if new_state != row["state"]:
                    db.execute("INSERT INTO transitions VALUES (?, ?, ?, NULL)",
                               (row["id"], now, new_state))
        if new_state != row["state"]:
            self._audit(row["id"], row["study_uid"], new_state, row["state"], None)
        return self.get(row["id"])

    def complete(self, job_id: int, state: str, reason: str | None = None, *,
                 expected: tuple[str, ...] = ACTIVE, **values: Any) -> Job:
        """Advance a job to ``state`` (``ready``, ``sending``, ``done`` ...), storing ``values``.
        Raises :class:`JobChanged` unless the job is in one of the ``expected`` states (an
        administrator may have cancelled it meanwhile)."""
        return self._transition(job_id, state, reason, expected=expected, **values)

    def fail(self, job_id: int, reason: str, *, state: str = FAILED,
             expected: tuple[str, ...] = ACTIVE, **values: Any) -> Job:
        """End a job as ``failed`` (or ``rejected``) with the reason a person can act on
        (and ``values``, e.g. the result of the screening that rejected it)."""
        return self._transition(job_id, state, reason, expected=expected, **values)

    def retry(self, job_id: int, state: str, reason: str, delay_s: float, *,
              expected: tuple[str, ...] = ACTIVE) -> Job:
        """Put a job back in ``state`` to be attempted again after ``delay_s`` seconds."""
        return self._transition(job_id, state, reason, expected=expected,
                                next_attempt_at=time.time() + delay_s)

    # -- administration -----------------------------------------------------------------------

    def cancel(self, job_id: int, reason: str = "cancelled by an administrator") -> Job:
        """Stop a job that has not finished; it will not be processed or sent."""
        job = self.get(job_id)
        if job.state in TERMINAL:
            raise config.InputError(f"job {job_id} is already {job.state}; nothing to cancel")
        return self._transition(job_id, CANCELLED, reason, expected=ACTIVE)

    def requeue(self, job_id: int, reason: str = "retried by an administrator",
                force: bool = False) -> Job:
        """Process a failed, rejected or cancelled job again from the start; ``force`` (a job
        screening refused) processes it whatever screening says, the verdict saying so."""
        job = self.get(job_id)
        if force and job.state != REJECTED:
            raise config.InputError(f"job {job_id} is {job.state}; --force is for a study "
                                    "screening rejected")
        if job.state not in (FAILED, REJECTED, CANCELLED):
            raise config.InputError(
                f"job {job_id} is {job.state}; only failed, rejected or cancelled jobs can be "
                "retried")
        if not job.t1w_series_uid or not job.inputs and not job.t2w_series_uid:
            raise config.InputError(
                f"job {job_id} never had both a T1w and a T2w series; send the missing series "
                "and a new job starts by itself")
        if job.route is None:
            raise config.InputError(
                f"job {job_id} matched no route ({job.reason}); add a route that matches it, "
                "then send the study again")
        return self._transition(job_id, READY, reason, expected=(FAILED, REJECTED, CANCELLED),
                                attempts=0, next_attempt_at=0.0, sending_since=None,
                                forced=int(force))

    def recover(self) -> list[int]:
        """After a restart: jobs left ``running`` by a dead process become ``ready`` again and
        held ``sending`` jobs become due. Returns the ids recovered."""
        with self._lock:
            rows = self._db().execute("SELECT id, state FROM jobs WHERE state IN (?, ?)",
                                      (RUNNING, SENDING)).fetchall()
        for row in rows:
            if row["state"] == RUNNING:
                self._transition(row["id"], READY, RESUMED, next_attempt_at=0.0)
            else:
                self._transition(row["id"], SENDING, RESUMED, next_attempt_at=0.0)
        return [r["id"] for r in rows]

    def get(self, job_id: int) -> Job:
        with self._lock:
            row = self._db().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise config.InputError(f"there is no job {job_id}")
        return Job.from_row(row)

    def list(self, states: tuple[str, ...] | None = None, study_uid: str | None = None,
             limit: int | None = None) -> list[Job]:
        query, args = "SELECT * FROM jobs WHERE 1=1", []
        if states:
            query += f" AND state IN ({', '.join('?' for _ in states)})"
            args += list(states)
        if study_uid:
            query += " AND study_uid = ?"
            args.append(study_uid)
        query += " ORDER BY id DESC"
        if limit:
            query += f" LIMIT {int(limit)}"
        with self._lock:
            rows = self._db().execute(query, args).fetchall()
        return [Job.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state (states without jobs left out)."""
        with self._lock:
            rows = self._db().execute(
                "SELECT state, count(*) AS n FROM jobs GROUP BY state").fetchall()
        return {r["state"]: int(r["n"]) for r in rows}

    def oldest_waiting(self) -> float | None:
        """When the oldest job that has not finished (waiting, ready, running or sending)
        was created (epoch seconds), or None."""
        with self._lock:
            row = self._db().execute(
                f"SELECT min(created_at) AS t FROM jobs WHERE state IN "
                f"({', '.join('?' for _ in ACTIVE)})", ACTIVE).fetchone()
        return None if row is None or row["t"] is None else float(row["t"])

    def mark_purged(self, job_id: int, at: float | None = None) -> None:
        """Record in a finished job's result that retention deleted its data."""
        with self._lock:
            db = self._db()
            with transaction(db):
                row = db.execute("SELECT result FROM jobs WHERE id = ?", (job_id,)).fetchone()
                result = json.loads(row["result"] or "{}") if row else {}
                result["purged_at"] = time.time() if at is None else at
                db.execute("UPDATE jobs SET result = ? WHERE id = ?",
                           (json.dumps(result), job_id))

    def transitions(self, job_id: int) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db().execute(
                "SELECT at, state, reason FROM transitions WHERE job_id = ? ORDER BY rowid",
                (job_id,)).fetchall()
        return [dict(r) for r in rows]

    def record_outputs(self, job_id: int, objects: Sequence[WrittenObject]) -> None:
        """Remember the objects a job wrote, in sending order, replacing earlier ones."""
        with self._lock:
            db = self._db()
            with transaction(db):
                db.execute("DELETE FROM outputs WHERE job_id = ?", (job_id,))
                db.executemany(
                    "INSERT INTO outputs (job_id, sop_instance_uid, path, sop_class_uid, "
                    "transfer_syntax_uid, position) VALUES (?, ?, ?, ?, ?, ?)",
                    [(job_id, o.sop_instance_uid, str(o.path), o.sop_class_uid,
                      o.transfer_syntax_uid, k) for k, o in enumerate(objects)])

    def outputs(self, job_id: int) -> list[Output]:
        """The objects a job wrote, in sending order (images before what references them)."""
        with self._lock:
            rows = self._db().execute(
                "SELECT sop_instance_uid, path, sop_class_uid, transfer_syntax_uid FROM outputs "
                "WHERE job_id = ? ORDER BY position, path", (job_id,)).fetchall()
        return [Output(r["sop_instance_uid"], Path(r["path"]), r["sop_class_uid"],
                       r["transfer_syntax_uid"]) for r in rows]

    def record_delivery(self, job_id: int, destination: str, sop_instance_uid: str) -> None:
        with self._lock:
            self._db().execute("INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?)",
                               (job_id, destination, sop_instance_uid, time.time()))

    def delivered_anywhere(self, destination: str, uids: Sequence[str]) -> set[str]:
        """Which of ``uids`` any job has delivered to ``destination`` (the delivery ledger:
        output UIDs name their exact inputs and model, so one delivered is never sent again,
        whichever job wrote it)."""
        found: set[str] = set()
        with self._lock:
            for start in range(0, len(uids), 500):
                part = list(uids[start:start + 500])
                found |= {r["sop_instance_uid"] for r in self._db().execute(
                    f"SELECT DISTINCT sop_instance_uid FROM deliveries WHERE destination = ? "
                    f"AND sop_instance_uid IN ({', '.join('?' for _ in part)})",
                    (destination, *part)).fetchall()}
        return found

    def forget_deliveries(self, destination: str, uids: Sequence[str]) -> None:
        """Drop the delivery records of ``uids`` at ``destination`` (every job's): the peer
        did not commit them, so they are to be sent again."""
        with self._lock:
            db = self._db()
            with transaction(db):
                for start in range(0, len(uids), 500):
                    part = list(uids[start:start + 500])
                    db.execute(f"DELETE FROM deliveries WHERE destination = ? AND "
                               f"sop_instance_uid IN ({', '.join('?' for _ in part)})",
                               (destination, *part))

    def note(self, job_id: int, reason: str, *, expected: tuple[str, ...] = (RUNNING,),
             **values: Any) -> None:
        """Say where a job stands without changing its state or its deadlines (e.g. which
        worker runs it), storing ``values`` (e.g. ``result``); kept in its history, not
        audited. Nothing happens unless the job is in one of the ``expected`` states."""
        now = time.time()
        values = _encoded(values)
        sets = "".join(f", {k} = ?" for k in values)
        with self._lock:
            db = self._db()
            with transaction(db):
                row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None or row["state"] not in expected:
                    return
                db.execute(f"UPDATE jobs SET reason = ?, updated_at = ?{sets} WHERE id = ?",
                           (reason, now, *values.values(), job_id))
                db.execute("INSERT INTO transitions VALUES (?, ?, ?, ?)",
                           (job_id, now, row["state"], reason))

    def extend_claim(self, job_id: int) -> None:
        """Keep a ``running`` job invisible to other workers for another :data:`CLAIM_S`
        (its worker is still following it, e.g. on a Celery worker)."""
        with self._lock:
            db = self._db()
            with transaction(db):
                db.execute("UPDATE jobs SET next_attempt_at = ? WHERE id = ? AND state = ?",
                           (time.time() + CLAIM_S, job_id, RUNNING))

    def wake(self, job_id: int) -> None:
        """Make a ``sending`` job due now (a peer reported what it waited for)."""
        with self._lock:
            db = self._db()
            with transaction(db):
                db.execute("UPDATE jobs SET next_attempt_at = 0 WHERE id = ? AND state = ?",
                           (job_id, SENDING))

    def delivered(self, job_id: int, destination: str) -> set[str]:
        with self._lock:
            rows = self._db().execute(
                "SELECT sop_instance_uid FROM deliveries WHERE job_id = ? AND destination = ?",
                (job_id, destination)).fetchall()
        return {r["sop_instance_uid"] for r in rows}

    # -- internals ----------------------------------------------------------------------------

    def _transition(self, job_id: int, state: str, reason: str | None, *,
                    expected: tuple[str, ...] | None = None, **values: Any) -> Job:
        if state not in STATES:
            raise ValueError(f"unknown job state {state!r}")
        now = time.time()
        values = _encoded(values)
        if state == SENDING and "sending_since" not in values:
            values["sending_since"] = now
        if state != SENDING and "next_attempt_at" not in values:
            values["next_attempt_at"] = 0.0
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._lock:
            db = self._db()
            with transaction(db):
                before = db.execute("SELECT state, study_uid, sending_since FROM jobs "
                                    "WHERE id = ?", (job_id,)).fetchone()
                if before is None:
                    raise config.InputError(f"there is no job {job_id}")
                if expected is not None and before["state"] not in expected:
                    raise JobChanged(f"job {job_id} is {before['state']} now; not moving it to "
                                     f"{state}")
                if before["state"] == SENDING and state == SENDING:
                    values.pop("sending_since", None)
                    sets = ", ".join(f"{k} = ?" for k in values)
                db.execute(f"UPDATE jobs SET state = ?, reason = ?, updated_at = ?"
                           f"{', ' + sets if sets else ''} WHERE id = ?",
                           (state, reason, now, *values.values(), job_id))
                db.execute("INSERT INTO transitions VALUES (?, ?, ?, ?)",
                           (job_id, now, state, reason))
        self._audit(job_id, before["study_uid"], state, before["state"], reason)
        return self.get(job_id)

    def _audit(self, job_id: int, study_uid: str, state: str, previous: str | None,
               reason: str | None) -> None:
        if self.audit is None:
            return
        outcome = "failure" if state in (FAILED, REJECTED) else "success"
        fields: dict[str, Any] = {"job_id": job_id, "study_uid": study_uid, "state": state}
        if previous is not None:
            fields["previous_state"] = previous
        try:  # the transition is committed; a failing audit log must not undo the node's work
            self.audit.record(f"job.{state}", outcome=outcome, reason=reason, **fields)
        except config.StorageError as exc:
            log.error("job %d: audit record job.%s not written: %s", job_id, state, exc.reason)
