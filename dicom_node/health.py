"""Is the node able to do its job right now? (``/healthz``, ``vcemri status``)

Healthy means: the SCP's listening socket is open, the database takes a write lock, the spool
takes an fsynced file, and the disk has more free space than ``storage.min_free_mib`` (below
it every instance is refused). Each failed check is one sentence a person can act on.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .node import Node


@dataclass(frozen=True)
class Health:
    """The checks' verdict: ``problems`` empty means healthy."""

    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {"status": "ok" if self.ok else "unhealthy", "problems": self.problems}


def check(node: Node) -> Health:
    """Run every check against a started node."""
    problems = []
    server = node.scp.server
    if server is None or server.socket.fileno() < 0:
        problems.append("the DICOM SCP is not listening")
    try:
        db = node.queue._db()
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
    except sqlite3.Error as exc:
        problems.append(f"the node database cannot be written: {exc}")
    probe = node.spool.directory / f".healthz.{os.getpid()}.tmp"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        problems.append(f"the spool {node.spool.directory} cannot be written: "
                        f"{exc.strerror or exc}")
    finally:
        probe.unlink(missing_ok=True)
    free, floor = node.spool.free_mib(), node.settings.storage.min_free_mib
    if free < floor:
        problems.append(f"only {free:.0f} MiB free under {node.spool.directory}: instances are "
                        f"refused below storage.min_free_mib ({floor})")
    return Health(problems)
