"""Retention: the spooled inputs and the outputs of finished jobs are deleted once they are old
enough (``storage.retention_days``, hourly, or ``vcemri jobs purge --older-than DAYS``), or,
oldest first, while the disk has less free space than a target (``storage.retention_free_mib``,
checked every minute, or ``vcemri jobs purge --free-mib MIB``).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import config

from . import jobs as states
from .jobs import Job, JobQueue, output_folder
from .spool import Spool

log = logging.getLogger(__name__)

#: How often the node purges when ``storage.retention_days`` is set (seconds).
PURGE_EVERY_S = 3600.0

#: How often the node compares free space with ``storage.retention_free_mib`` (seconds).
SPACE_CHECK_EVERY_S = 60.0

DAY_S = 86400.0


@dataclass
class Purge:
    """What a purge deleted (or, with ``dry_run``, would delete)."""

    jobs: list[int] = field(default_factory=list)
    instances: int = 0
    output_files: int = 0
    bytes: int = 0
    #: free space (MiB) before and after a free-space purge; None for an age purge
    free_before_mib: float | None = None
    free_after_mib: float | None = None


def _size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def _inputs(job: Job) -> set[str]:
    return {uid for pairs in job.inputs.values() for uid, _ in pairs}


def _purge_job(queue: JobQueue, spool: Spool, job: Job, needed: set[str], report: Purge, *,
               audit: config.AuditLog | None, user: str | None, dry_run: bool,
               why: str) -> None:
    """Delete one finished job's outputs and the inputs no job in ``needed`` still uses."""
    uids = sorted(_inputs(job) - needed)
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
                         count=removed + files, bytes=freed + size, user=user, reason=why)
        log.info("job %d purged (%s): %d spooled instances and %d output files (%d bytes)",
                 job.id, why, removed, files, freed + size)
    report.jobs.append(job.id)
    report.instances += removed
    report.output_files += files
    report.bytes += freed + size


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
              for uid in _inputs(j)}
    report = Purge()
    for job in sorted(due, key=lambda j: j.id):
        _purge_job(queue, spool, job, needed, report, audit=audit, user=user, dry_run=dry_run,
                   why=f"finished more than {older_than_s / DAY_S:g} days ago")
    return report


def purge_for_space(queue: JobQueue, spool: Spool, target_mib: float, *,
                    free_mib: Callable[[], float] | None = None,
                    audit: config.AuditLog | None = None, user: str | None = None,
                    dry_run: bool = False) -> Purge:
    """Purge finished jobs, the least recently changed first, until the spool's file system
    has ``target_mib`` free (``free_mib`` measures it; the spool's disk by default). Stops as
    soon as the target is met, and when no finished job is left: an unfinished job is never
    touched, so the target may stay unmet (the report says how far). A dry run adds up what
    each job would free instead of measuring the disk."""
    if target_mib <= 0:
        raise config.InputError("the free-space target must be positive")
    measure = free_mib or spool.free_mib
    report = Purge(free_before_mib=measure())
    free = report.free_before_mib
    everything = queue.list()
    candidates = sorted((j for j in everything if j.state in states.TERMINAL
                         and not j.result.get("purged_at")), key=lambda j: (j.updated_at, j.id))
    remaining = {j.id: j for j in everything if not j.result.get("purged_at")}
    for job in candidates:
        if free >= target_mib:
            break
        del remaining[job.id]
        needed = {uid for j in remaining.values() for uid in _inputs(j)}
        before = report.bytes
        _purge_job(queue, spool, job, needed, report, audit=audit, user=user, dry_run=dry_run,
                   why=f"free space {free:.0f} MiB below storage.retention_free_mib "
                       f"{target_mib:.0f}")
        free = free + (report.bytes - before) / 2**20 if dry_run else measure()
    report.free_after_mib = free
    if free < target_mib and not dry_run:
        log.warning("free space %.0f MiB is still below the retention target %.0f MiB: no "
                    "finished job is left to purge", free, target_mib)
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
