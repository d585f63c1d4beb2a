"""The append-only audit log: one JSON object per line, hash-chained, fsynced.

Every association, received instance count, job transition, sent object and rejection is
recorded here by the package that saw it. A record holds a sequence number, a UTC timestamp, a
dotted event name (``association.rejected``), an outcome, a user-facing reason when it failed,
structured fields from the PHI policy's allow-list (:data:`config.phi.ALLOWED_FIELDS`), and
``prev``: the SHA-256 of the previous line, so that editing or deleting a line in the middle
breaks the chain and :func:`verify` names the first broken record.

Several threads and processes may append to one file: each append holds an exclusive
``flock`` while it reads the last line and writes its own in one ``write`` call.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import StorageError
from .phi import check_field

Outcome = Literal["success", "failure"]

GENESIS = "0" * 64
_EVENT = re.compile(r"^[a-z][a-z_]*(\.[a-z][a-z_]*)+$")
_TAIL_CHUNK = 4096


@dataclass(frozen=True)
class Verification:
    """Result of :func:`verify`: ``ok`` and, when broken, the 1-based line and why."""

    records: int
    ok: bool
    broken_line: int | None = None
    problem: str | None = None


def _digest(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _last_line(fd: int) -> bytes | None:
    """The last complete line of the open file ``fd`` (None when the file is empty)."""
    end = os.lseek(fd, 0, os.SEEK_END)
    if end == 0:
        return None
    buffer = b""
    position = end
    while position > 0:
        step = min(_TAIL_CHUNK, position)
        position -= step
        buffer = os.pread(fd, step, position) + buffer
        body = buffer.rstrip(b"\n")
        newline = body.rfind(b"\n")
        if newline >= 0:
            return body[newline + 1:]
    return buffer.rstrip(b"\n")


def _sequence(last: bytes, path: Path) -> int:
    try:
        return int(json.loads(last)["seq"])
    except (ValueError, KeyError, TypeError):
        raise StorageError(
            f"the last line of the audit log {path} is damaged; it is not extended",
            hint="move the file aside; config.audit.verify() names the damaged line",
        ) from None


class AuditLog:
    """Appends audit records to ``path`` (created with its directory, mode 0600)."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()

    def record(
        self,
        event: str,
        *,
        outcome: Outcome = "success",
        reason: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Append one record and return it.

        ``fields`` must be allowed by the PHI policy; anything else is a programming error and
        raises ``ValueError`` before anything is written. A failure to write raises
        :class:`StorageError`: callers that acknowledge data must not do so without an audit
        trail.
        """
        if not _EVENT.match(event):
            raise ValueError(f"audit event {event!r} must be dotted lower case, e.g. 'job.failed'")
        if outcome not in ("success", "failure"):
            raise ValueError(f"audit outcome must be 'success' or 'failure', not {outcome!r}")
        for name, value in fields.items():
            check_field(name, value)
        try:
            with self._lock:
                return self._append(event, outcome, reason, fields)
        except OSError as exc:
            raise StorageError(
                f"cannot write the audit log {self.path}: {exc.strerror or exc}",
                hint="check the disk space and permissions of storage.root",
            ) from exc

    def _append(
        self, event: str, outcome: str, reason: str | None, fields: dict[str, Any]
    ) -> dict[str, Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = _last_line(fd)
            seq = 1 if last is None else _sequence(last, self.path) + 1
            entry: dict[str, Any] = {
                "seq": seq,
                "ts": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
                "event": event,
                "outcome": outcome,
            }
            if reason is not None:
                entry["reason"] = reason
            entry.update(fields)
            entry["prev"] = GENESIS if last is None else _digest(last)
            line = (json.dumps(entry, separators=(",", ":"), ensure_ascii=True) + "\n").encode()
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(28, f"short write ({written} of {len(line)} bytes)")
                if self.fsync:
                    os.fsync(fd)
            except OSError:
                os.ftruncate(fd, end)  # leave no torn line behind
                raise
            return entry
        finally:
            os.close(fd)  # closing releases the flock


def read(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of an audit log, oldest first."""
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def verify(path: str | os.PathLike[str]) -> Verification:
    """Check the hash chain and sequence numbers of an audit log."""
    previous: bytes | None = None
    count = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                entry = json.loads(line)
            except ValueError:
                return Verification(count, False, number, "line is not valid JSON")
            expected = GENESIS if previous is None else _digest(previous)
            if entry.get("prev") != expected:
                return Verification(count, False, number, "hash chain broken (line edited or removed)")
            if entry.get("seq") != number:
                return Verification(count, False, number, f"sequence {entry.get('seq')} != {number}")
            previous = line
            count += 1
    return Verification(count, True)
