"""Retention: the spooled inputs and the outputs of finished jobs are deleted once they are old
enough (``storage.retention_days``, hourly, or ``vcemri jobs purge --older-than DAYS``).

Only jobs in a terminal state (done, failed, rejected, cancelled) whose last change is older
than the cut-off are purged; an input instance that any other job still needs (one that is not
finished, or finished after the cut-off) is kept. The job's row, its transitions, its
deliveries and the audit log stay: the history is never purged, only the data. A purged job
records when (``result.purged_at``) and the purge is audited (``job.purged``, with counts and
bytes). Nothing here touches a job that is still running, waiting or sending.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import config

from . import jobs as states
from .jobs import JobQueue, output_folder
from .spool import Spool

log = logging.getLogger(__name__)

#: How often the node purges when ``storage.retention_days`` is set (seconds).
PURGE_EVERY_S = 3600.0

DAY_S = 86400.0


@dataclass
class Purge:
    """What a purge deleted (or, with ``dry_run``, would delete)."""

    jobs: list[int] = field(default_factory=list)
    instances: int = 0
    output_files: int = 0
    bytes: int = 0


def _size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def purge(queue: JobQueue, spool: Spool, older_than_s: float, *, now: float | None = None,
          audit: config.AuditLog | None = None, user: str | None = None,
          dry_run: bool = False) -> Purge:
    """Delete the inputs and outputs of jobs finished more than ``older_than_s`` ago."""
    if older_than_s <= 0:
        raise config.InputError("the retention period must be positive")
    cutoff = (time.time() if now is None else now) - older_than_s
    everything = queue.list()
    due = [j for j in everything if j.state in states.TERMINAL and j.updated_at < cutoff
           and not j.result.get("purged_at")]
    purging = {j.id for j in due}
    needed = {uid for j in everything if j.id not in purging and not j.result.get("purged_at")
              for pairs in j.inputs.values() for uid, _ in pairs}
    report = Purge()
    for job in sorted(due, key=lambda j: j.id):
        uids = sorted({uid for pairs in job.inputs.values() for uid, _ in pairs} - needed)
        folder = output_folder(queue.root, job.id)
        files, size = _size(folder)
        if dry_run:
            removed, freed = spool.measure(uids)
        else:
            removed, freed = spool.remove(uids)
            shutil.rmtree(folder, ignore_errors=True)
            queue.mark_purged(job.id)
            if audit is not None:
                audit.record("job.purged", job_id=job.id, study_uid=job.study_uid,
                             count=removed + files, bytes=freed + size, user=user)
            log.info("job %d purged: %d spooled instances and %d output files (%d bytes)",
                     job.id, removed, files, freed + size)
        report.jobs.append(job.id)
        report.instances += removed
        report.output_files += files
        report.bytes += freed + size
    return report


def days(value: str) -> float:
    """``--older-than`` values: days (``30``, ``0.5``) -> seconds."""
    try:
        number = float(value)
    except ValueError:
        raise config.InputError(f"--older-than takes a number of days, not {value!r}") from None
    if not number > 0:
        raise config.InputError("--older-than must be a positive number of days")
    return number * DAY_S
