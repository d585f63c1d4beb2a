"""What an administrator does to a job, from the command line or the dashboard: the same
checks, the same audit records, the user's name in both."""

from __future__ import annotations

from .jobs import Job, JobQueue


def retry(queue: JobQueue, job_id: int, user: str, *, force: bool = False) -> Job:
    """Process a failed, rejected or cancelled job again; ``force``: a study screening
    rejected is processed whatever screening says (audited ``job.forced``; every object it
    writes says it was refused and forced)."""
    if not force:
        return queue.requeue(job_id, f"retried by {user}")
    job = queue.requeue(job_id, f"forced through screening by {user}", force=True)
    if queue.audit is not None:
        queue.audit.record("job.forced", job_id=job.id, study_uid=job.study_uid, user=user,
                           outcome="success",
                           reason="processed whatever screening says; every object says so")
    return job


def cancel(queue: JobQueue, job_id: int, user: str) -> Job:
    """Stop a job that has not finished (its state change is audited with the user)."""
    return queue.cancel(job_id, f"cancelled by {user}")
