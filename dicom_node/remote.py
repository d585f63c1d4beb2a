"""The node's side of ``jobs.backend: celery``: a job's synthesis sent to ``vcemri worker``s.

:class:`RemoteSynthesis` has the interface of ``synthesis_process.SynthesisProcess`` (``run``
a :class:`Request`, get an :class:`Outcome`), so a node worker thread claims, screens the
outcome, records the outputs and delivers exactly as with local synthesis; only where the
synthesis runs changes. The thread sends the task to its model's queue (``broker``), follows
it (queued, running on which worker) in the job's reason, and waits for its result.

At least once: a task whose worker died is run again by another worker (acks late, the
broker's visibility timeout); a task the broker lost altogether (no result after
``jobs.celery.task_timeout_s``) is dispatched again as the next attempt. A broker that is down
is waited for (the job stays ``running``, its reason says why), never counted as a failure of
the job. Exactly once at the TPS: the outputs' UIDs depend only on the inputs and the model,
and the delivery ledger sends each object to a destination once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import config

from . import broker
from .celery_tasks import relative, reroot
from .jobs import READY, RESUMED, RUNNING, JobChanged, JobQueue
from .synthesis_process import Outcome, Request, SynthesisCrashed

if TYPE_CHECKING:
    from synthesis import WrittenObject

log = logging.getLogger(__name__)

#: How often the node looks at a dispatched task (seconds).
POLL_S = 0.25

#: How often the node renews its claim of a job it follows (seconds; jobs.CLAIM_S is 3600).
EXTEND_S = 60.0

#: How often the node looks whether the job was cancelled meanwhile (seconds).
CHECK_JOB_S = 2.0

#: A task nobody took for this long: the job's reason says which workers consume its queue.
UNTAKEN_S = 5.0


def encode(request: Request, root: Path) -> dict[str, Any]:
    """A request as the task's JSON, its files relative to ``storage.root``."""
    return {
        "job_id": request.job_id,
        "t1w": [relative(p, root) for p in request.t1w],
        "t2w": None if request.t2w is None else [relative(p, root) for p in request.t2w],
        "extra": {role: [relative(p, root) for p in files]
                  for role, files in request.extra.items()},
        "out": relative(request.out, root),
        "model": request.model,
        "enforce": request.enforce,
        "supersedes": None if request.supersedes is None else asdict(request.supersedes),
    }


def _written(values: dict[str, Any] | None, root: Path) -> WrittenObject | None:
    from synthesis import WrittenObject

    if values is None:
        return None
    return WrittenObject(**{**values, "path": root / values["path"]})


def decode(answer: dict[str, Any], root: Path) -> Outcome:
    """A worker's answer as the outcome local synthesis would have given (paths on this
    node's storage root)."""
    summary = answer.get("summary") or {}
    if answer.get("storage_root") and answer["storage_root"] != str(root):
        summary = reroot(summary, answer["storage_root"], str(root))
    if summary:
        summary["worker"] = answer.get("worker")
    objects = [_written(o, root) for o in answer.get("objects") or []]
    return Outcome(answer["kind"], answer.get("reason", ""),
                   objects=[o for o in objects if o is not None], summary=summary,
                   device=answer.get("device", ""), notice=_written(answer.get("notice"), root),
                   details=answer.get("details", ""))


class RemoteSynthesis:
    """A node worker thread's way to Celery: :meth:`run` sends a study and waits for it."""

    def __init__(self, settings: config.Settings, queue: JobQueue) -> None:
        self.settings = settings
        self.queue = queue
        self.root = Path(settings.storage.root)
        self.job_id: int | None = None
        # built here, in the thread that builds the node (broker.node_app)
        self.app = broker.node_app(settings)
        self._stopping = threading.Event()

    def start(self) -> None:
        self._stopping.clear()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()

    def run(self, request: Request) -> Outcome:
        """The workers' outcome for ``request``; raises :class:`SynthesisCrashed` when no
        worker returned one in time (the job is then retried) or the node stops."""
        destination = broker.queue_name(
            self.settings, broker.device_class(self.settings, request.model))
        self.job_id = request.job_id
        payload = encode(request, self.root)
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        try:
            task_id = self._adoptable(request.job_id, digest)
            if task_id is None:
                if request.out.exists():  # what an earlier attempt wrote
                    shutil.rmtree(request.out)
                task_id = f"vcemri-job-{request.job_id}-{uuid.uuid4().hex[:12]}"
                self._send(payload, destination, task_id, request.job_id, digest)
            try:
                return self._wait(task_id, destination, request.job_id)
            except SynthesisCrashed:
                if not self._stopping.is_set():  # given up on: no worker may start it later
                    self._revoke(task_id)
                raise
        finally:
            self.job_id = None

    def _adoptable(self, job: int, digest: str) -> str | None:
        """The task this job was dispatched as before the node restarted, for this very
        request, when a worker runs it or has finished it (then it is followed, not run
        again); else None. Only right after a restart: a retry after a failure or an
        administrator's retry dispatches afresh."""
        resumed = [t for t in self.queue.transitions(job) if t["state"] == READY]
        if not resumed or resumed[-1]["reason"] != RESUMED:
            return None
        record = self.queue.get(job).result
        task_id = record.get("celery_task")
        if not task_id or record.get("request_sha256") != digest:
            return None
        try:
            state = self.app.AsyncResult(task_id).state
        except Exception:  # the result backend is down: dispatch again (at least once)
            return None
        if state not in ("STARTED", "SUCCESS", "RETRY"):
            return None
        log.info("job %d: following task %s (%s), dispatched before the node restarted",
                 job, task_id, state.lower())
        self._note(job, f"following task {task_id}, dispatched before the node restarted "
                   f"({state.lower()})")
        return task_id

    # -- internals ----------------------------------------------------------------------------

    def _send(self, payload: dict[str, Any], destination: str, task_id: str, job: int,
              digest: str) -> None:
        url = broker.redacted(self.settings.jobs.celery.broker_url)
        told = False
        extended = time.monotonic()
        # recorded before it is sent, so that a node restarted after sending can follow it
        self._note(job, f"sending to {destination}",
                   result={"celery_task": task_id, "queue": destination,
                           "request_sha256": digest})
        while True:
            if time.monotonic() - extended > EXTEND_S:
                extended = time.monotonic()
                self.queue.extend_claim(job)
            state = self.queue.get(job).state
            if state != RUNNING:  # cancelled while the broker was down
                raise JobChanged(f"job {job} is {state} now; not sent")
            try:
                self.app.send_task(broker.TASK, kwargs={"request": payload}, queue=destination,
                                   task_id=task_id, retry=False)
                break
            except Exception as exc:  # the broker is down: wait for it, the job is not at fault
                if not told:
                    log.warning("job %d: the broker %s cannot be reached (%s); waiting for it",
                                job, url, type(exc).__name__)
                    self._note(job, f"waiting for the broker {url} ({type(exc).__name__})")
                    told = True
                if self._stopping.wait(1.0):
                    raise SynthesisCrashed(self._stopped(job)) from exc
        log.info("job %d: sent to queue %s (task %s)", job, destination, task_id)
        self._note(job, f"queued on {destination} for a worker")

    def _wait(self, task_id: str, destination: str, job: int) -> Outcome:
        options = self.settings.jobs.celery
        result = self.app.AsyncResult(task_id)
        sent = time.monotonic()
        seen: str | None = None
        broker_down = False
        looked_for_workers = checked_job = 0.0
        extended = time.monotonic()
        while not self._stopping.wait(POLL_S):
            if time.monotonic() - extended > EXTEND_S:  # still followed: no one else claims it
                extended = time.monotonic()
                self.queue.extend_claim(job)
            if time.monotonic() - checked_job > CHECK_JOB_S:
                checked_job = time.monotonic()
                current = self.queue.get(job).state
                if current != RUNNING:  # cancelled by an administrator meanwhile
                    self._revoke(task_id)
                    raise JobChanged(f"job {job} is {current} now; its task {task_id} was "
                                     "revoked")
            try:
                state = result.state
                info = result.info if state in ("STARTED", "SUCCESS", "FAILURE") else None
            except Exception as exc:  # the result backend is down: wait for it
                if not broker_down:
                    log.warning("job %d: the result backend cannot be reached (%s); waiting "
                                "for it", job, type(exc).__name__)
                    broker_down = True
                continue
            if broker_down:
                log.info("job %d: the result backend is back", job)
                broker_down = False
            if state == "SUCCESS" and isinstance(info, dict):
                outcome = decode(info, self.root)
                self._sweep(job)
                log.info("job %d: %s by %s%s", job, outcome.kind, info.get("worker"),
                         " (a duplicate run's identical files were dropped)"
                         if info.get("duplicate") else "")
                self._forget(result)
                return outcome
            if state == "FAILURE":
                self._forget(result)
                return Outcome("error", f"the worker's task failed: {type(info).__name__}: "
                               f"{info}", details=str(getattr(result, "traceback", "") or ""))
            if state == "STARTED" and isinstance(info, dict):
                where = f"{info.get('hostname')} (pid {info.get('pid')})"
                if where != seen:
                    seen = where
                    log.info("job %d: running on worker %s", job, where)
                    self._note(job, f"running on worker {where}")
            elif (seen is None and time.monotonic() - sent > UNTAKEN_S
                  and time.monotonic() - looked_for_workers > 60.0):
                looked_for_workers = time.monotonic()
                self._note(job, f"queued on {destination}; {self._who_serves(destination)}")
            if time.monotonic() - sent > options.task_timeout_s:
                raise SynthesisCrashed(
                    f"no worker returned job {job}'s result within "
                    f"{options.task_timeout_s:.0f} s (jobs.celery.task_timeout_s; queue "
                    f"{destination}{', last on ' + seen if seen else ''}); dispatching it again")
        raise SynthesisCrashed(self._stopped(job))

    def _who_serves(self, destination: str) -> str:
        try:
            found = broker.workers(self.settings, 1.0, app=self.app)
        except config.PeerError as exc:
            return exc.reason
        serving = [w.name for w in found if destination in w.queues]
        if serving:
            return f"busy workers consume it: {', '.join(serving)}"
        return ("no worker consuming it is up" + (f" (up: {', '.join(w.name for w in found)})"
                                                  if found else "")
                + (": start a vcemri worker on a machine with a GPU"
                   if destination.endswith("." + broker.GPU) else ": start a vcemri worker"))

    def _note(self, job: int, reason: str, **values: Any) -> None:
        try:
            self.queue.note(job, reason, expected=(RUNNING,), **values)
        except Exception:  # a note is for people; the job goes on without it
            log.debug("job %d: note not recorded", job, exc_info=True)

    def _sweep(self, job: int) -> None:
        """Remove the staging folders other runs of the job left (a worker killed mid-task):
        the job has its result, so no run's files are needed any more (a duplicate still
        running finds its folder gone and its result unread)."""
        for folder in (self.root / "outputs" / ".staging").glob(f"job-{job:06d}.*"):
            shutil.rmtree(folder, ignore_errors=True)
            log.info("job %d: removed %s, left by an interrupted run", job, folder.name)

    def _revoke(self, task_id: str) -> None:
        try:
            self.app.control.revoke(task_id)
        except Exception:  # a worker that runs it anyway writes files nobody sends
            log.debug("task %s not revoked", task_id, exc_info=True)

    def _forget(self, result: Any) -> None:
        try:
            result.forget()
        except Exception:  # it expires by itself (result_expires)
            log.debug("result not forgotten", exc_info=True)

    @staticmethod
    def _stopped(job: int) -> str:
        return (f"the node stopped while job {job} was with the workers; it is dispatched "
                "again at the next start")
