"""Storage commitment (PS3.4 Annex J, Push Model) toward destinations that ask for it.

A C-STORE success status says a peer received an object, not that it keeps it: a PACS may
drop it later (a routing rule, a full disk, a database it failed to update). With
``destinations.<name>.storage_commitment`` the node asks the peer, once every object of a job
is delivered, to commit all of them (N-ACTION, Action Type 1, a new Transaction UID), and the
job stays ``sending`` until the peer's N-EVENT-REPORT says so; peers answer on an association
of their own toward the node's port (J.3.3.1.2), which the SCP accepts for that peer's AE
title and hands to :class:`CommitmentReports`. Then:

- every object committed (Event Type 1) -> the job is ``done``;
- some not (Event Type 2) -> the job's reason lists them with the peer's Failure Reason; they
  are sent again after a backoff, and commitment is asked again, until
  ``jobs.send_max_age_s``: then the job fails listing the objects still uncommitted;
- no report within ``commitment_timeout_s`` -> asked again (a new transaction), the same way.

:class:`CommitmentLedger` keeps each transaction in the node's database (schema version 7), so
a report that arrives while the node restarts, or after, still finds its job.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import config

from .database import Connections, transaction
from .jobs import JobQueue, Output
from .sender import associate, sop_class_and_syntax

log = logging.getLogger(__name__)

#: Storage Commitment Push Model SOP Class and its well-known SOP Instance (PS3.4 J.3.5).
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"

#: Commitment states: asked and waiting; every object committed; the peer reported failures
#: the node has not yet acted on; replaced by a newer request (after failures or a timeout).
PENDING, COMMITTED, FAILED, SUPERSEDED = "pending", "committed", "failed", "superseded"

#: Failure Reason (0008,1197) values, PS3.4 J.3.3.1.1.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "SOP class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}

#: N-EVENT-REPORT response status for a report the node cannot match (PS3.7 C.4.3).
PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class Commitment:
    """One N-ACTION transaction toward a destination for a job's outputs."""

    transaction_uid: str
    job_id: int
    destination: str
    called_ae: str
    count: int
    requested_at: float
    state: str
    reported_at: float | None = None
    #: uncommitted objects as the peer reported them: (SOP Instance UID, reason in words)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> str:
        """One line for people: ``committed (transaction <uid>)``, ``waiting for the report
        ...``, ``not committed: 1 of 10 objects: ...``."""
        if self.state == COMMITTED:
            return f"committed all {self.count} objects (transaction {self.transaction_uid})"
        if self.state == PENDING:
            return (f"storage commitment of {self.count} objects asked, waiting for the report "
                    f"(transaction {self.transaction_uid})")
        if self.failures:
            return f"not committed: {self.describe_failures()}"
        return f"no report for transaction {self.transaction_uid}; asked again"

    def describe_failures(self, limit: int = 5) -> str:
        """``2 of 10 objects: <uid> (no such object instance), ...``."""
        shown = ", ".join(f"{uid} ({why})" for uid, why in self.failures[:limit])
        more = len(self.failures) - limit
        return (f"{len(self.failures)} of {self.count} objects: {shown}"
                + (f" and {more} more" if more > 0 else ""))


class CommitmentLedger:
    """Storage commitment transactions in the node's database."""

    def __init__(self, root: Path) -> None:
        self._connections = Connections(Path(root))

    def requested(self, transaction_uid: str, job_id: int, destination: str, called_ae: str,
                  count: int) -> None:
        """Record a request before it is sent, so that a quick report finds it."""
        db = self._connections.get()
        with transaction(db):
            db.execute("INSERT INTO commitments VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                       (transaction_uid, job_id, destination, called_ae, count, time.time(),
                        PENDING))

    def forget(self, transaction_uid: str) -> None:
        """Drop a request that never reached the peer."""
        db = self._connections.get()
        with transaction(db):
            db.execute("DELETE FROM commitments WHERE transaction_uid = ?", (transaction_uid,))

    def supersede(self, transaction_uid: str) -> None:
        db = self._connections.get()
        with transaction(db):
            db.execute("UPDATE commitments SET state = ? WHERE transaction_uid = ?",
                       (SUPERSEDED, transaction_uid))

    def get(self, transaction_uid: str) -> Commitment | None:
        row = self._connections.get().execute(
            "SELECT * FROM commitments WHERE transaction_uid = ?", (transaction_uid,)).fetchone()
        return None if row is None else _commitment(row)

    def latest(self, job_id: int, destination: str) -> Commitment | None:
        """The job's newest transaction with ``destination`` (None when none was asked)."""
        row = self._connections.get().execute(
            "SELECT * FROM commitments WHERE job_id = ? AND destination = ? "
            "ORDER BY requested_at DESC, rowid DESC LIMIT 1", (job_id, destination)).fetchone()
        return None if row is None else _commitment(row)

    def reported(self, transaction_uid: str, failures: Sequence[tuple[str, str]]) -> None:
        """Record the peer's report: committed, or failed with ``failures``."""
        db = self._connections.get()
        with transaction(db):
            db.execute("UPDATE commitments SET state = ?, reported_at = ?, failures = ? "
                       "WHERE transaction_uid = ? AND state = ?",
                       (FAILED if failures else COMMITTED, time.time(),
                        json.dumps([list(f) for f in failures]), transaction_uid, PENDING))


def _commitment(row: Any) -> Commitment:
    values = dict(row)
    values["failures"] = [tuple(f) for f in json.loads(values["failures"] or "[]")]
    return Commitment(**values)


def request(outputs: Sequence[Output], destination: config.Destination, name: str, *,
            calling_ae: str, timeouts: Any, ledger: CommitmentLedger, job_id: int) -> str:
    """Ask ``destination`` to commit ``outputs`` (N-ACTION); returns the Transaction UID.
    Raises :class:`config.PeerError` when the peer cannot be asked or refuses."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

    where = f"{name} ({destination.ae_title}@{destination.host}:{destination.port})"
    sop_classes = {o.sop_instance_uid: sop_class_and_syntax(o)[0] for o in outputs}
    dataset = Dataset()
    dataset.TransactionUID = generate_uid()
    references = []
    for uid, sop_class in sop_classes.items():
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = uid
        references.append(item)
    dataset.ReferencedSOPSequence = references
    ledger.requested(dataset.TransactionUID, job_id, name, destination.ae_title,
                     len(references))
    try:
        assoc = associate(destination, name, calling_ae=calling_ae, timeouts=timeouts,
                          contexts={STORAGE_COMMITMENT: {ExplicitVRLittleEndian,
                                                         ImplicitVRLittleEndian}})
    except config.PeerError:
        ledger.forget(dataset.TransactionUID)
        raise
    try:
        try:
            status, _ = assoc.send_n_action(dataset, 1, STORAGE_COMMITMENT,
                                            STORAGE_COMMITMENT_INSTANCE)
        except ValueError as exc:  # the peer accepted no storage commitment context
            raise config.PeerError(f"destination {where} does not support storage "
                                   f"commitment: {exc}") from exc
        code = getattr(status, "Status", None)
        if code != 0:
            raise config.PeerError(
                f"destination {where} refused the storage commitment request: "
                + ("no response" if code is None else f"status 0x{int(code):04X}"))
    except config.PeerError:
        ledger.forget(dataset.TransactionUID)
        raise
    finally:
        if assoc.is_established:
            assoc.release()
    return str(dataset.TransactionUID)


class CommitmentReports:
    """Handles the N-EVENT-REPORTs peers send the SCP: records them and wakes their jobs."""

    def __init__(self, ledger: CommitmentLedger, queue: JobQueue,
                 audit: config.AuditLog | None = None) -> None:
        self.ledger = ledger
        self.queue = queue
        self.audit = audit

    def handle(self, event: Any) -> int:
        """pynetdicom's ``EVT_N_EVENT_REPORT`` handler; returns the response status."""
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            report = event.event_information
            transaction_uid = str(report.TransactionUID)
        except Exception as exc:  # an unreadable report: say so to the peer and the log
            return self._refuse(calling, f"unreadable storage commitment report: {exc}")
        known = self.ledger.get(transaction_uid)
        if known is None:
            return self._refuse(calling, f"storage commitment report for unknown transaction "
                                         f"{transaction_uid}")
        if known.called_ae != calling:
            return self._refuse(calling, f"storage commitment report for transaction "
                                         f"{transaction_uid} came from {calling}, not from "
                                         f"{known.called_ae}, which was asked")
        committed = {str(i.ReferencedSOPInstanceUID)
                     for i in report.get("ReferencedSOPSequence", [])}
        failures = [(str(i.ReferencedSOPInstanceUID),
                     FAILURE_REASONS.get(int(i.get("FailureReason", 0x0110)),
                                         f"failure reason 0x{int(i.get('FailureReason', 0)):04X}"))
                    for i in report.get("FailedSOPSequence", [])]
        if len(committed) + len(failures) < known.count and not failures:
            failures = [("(unnamed)", f"the report names {len(committed)} of {known.count} "
                                      "objects")]
        self.ledger.reported(transaction_uid, failures)
        self.queue.wake(known.job_id)
        if failures:
            log.warning("job %d: %s did not commit %d of %d objects (transaction %s)",
                        known.job_id, known.destination, len(failures), known.count,
                        transaction_uid)
        else:
            log.info("job %d: %s committed all %d objects (transaction %s)", known.job_id,
                     known.destination, known.count, transaction_uid)
        if self.audit is not None:
            self.audit.record("commitment.reported", outcome="failure" if failures else "success",
                              reason=(f"{len(failures)} of {known.count} objects not committed"
                                      if failures else None),
                              job_id=known.job_id, destination=known.destination,
                              calling_ae=calling, count=known.count)
        return 0x0000

    def _refuse(self, calling: str, reason: str) -> int:
        log.warning("%s (from %s)", reason, calling)
        if self.audit is not None:
            self.audit.record("commitment.reported", outcome="failure", reason=reason,
                              calling_ae=calling)
        return PROCESSING_FAILURE
