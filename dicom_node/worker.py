"""Workers: a ``ready`` job is synthesized and written, then a ``sending`` job is delivered.

A worker is a thread of the node that claims jobs and delivers them; the synthesis itself runs
in the worker's child process (``synthesis_process.py``), so a crash there (kill -9, a native
crash, no memory) fails one attempt of one job, never the node.

Outcomes, each with a reason in the job, the log and the audit log:
- screening refuses the study -> ``rejected``;
- bad input or an unusable model (``InputError``, ``ModelError``) -> ``failed`` at once
  (retrying cannot help);
- anything else, the synthesis process dying included -> retried with exponential backoff up
  to ``jobs.max_attempts``, then ``failed``;
- a destination that is down -> ``sending`` again after a backoff, until
  ``jobs.send_max_age_s`` has passed since sending began -> ``failed``.

Output UIDs depend only on the inputs and the model (``planning``), so a job that runs twice
(after a crash, or retried by an administrator) writes the same objects and the TPS never
receives a duplicate series.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import config

from . import commitment
from . import jobs as states
from .jobs import Job, JobQueue, output_folder
from .lineage import superseded
from .metrics import Metrics
from .remote import RemoteSynthesis
from .sender import send
from .spool import Spool
from .synthesis_process import Request, SynthesisCrashed, SynthesisProcess

log = logging.getLogger(__name__)

#: How the reason of a retry ends in the job's transitions (and so how a failed delivery
#: attempt is told from a storage-commitment wait or a resume, which re-enter ``sending``
#: without failing).
RETRYING = "; retrying in "


def delivery_attempt(transitions: list[dict[str, Any]]) -> int:
    """Which delivery attempt of a job a failure now ends (1-based), from its transitions
    (``JobQueue.transitions``): one more than the failed attempts since the job last entered
    ``sending`` from another state, so neither commitment waits nor an earlier run before an
    administrator's retry lengthen its backoff."""
    failed = 0
    for transition in transitions:
        if transition["state"] != states.SENDING:
            failed = 0
        elif RETRYING in (transition["reason"] or ""):
            failed += 1
    return failed + 1


class Worker:
    """Processes jobs from the queue until :meth:`stop`; run several for parallel jobs."""

    def __init__(self, settings: config.Settings, queue: JobQueue, spool: Spool,
                 audit: config.AuditLog | None = None,
                 name: str = "worker", metrics: Metrics | None = None,
                 commitments: commitment.CommitmentLedger | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.spool = spool
        #: where this worker's jobs are synthesized: its child process, or (jobs.backend
        #: celery) the Celery workers
        self.process: SynthesisProcess | RemoteSynthesis = (
            RemoteSynthesis(settings, queue)
            if settings.jobs.backend == "celery"
            else SynthesisProcess(settings, name=f"{name}-synthesis", queue=queue))
        self.commitments = commitments or commitment.CommitmentLedger(queue.root)
        self.audit = audit
        self.metrics = metrics
        self.name = name
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if isinstance(self.process, RemoteSynthesis):
            self.process.stop()  # stop following the job; the Celery worker goes on with it

    def join(self, timeout: float | None = None) -> None:
        """Wait for the job in progress (up to ``timeout`` seconds), then end the child; a
        job cut off resumes at the next start."""
        if self.thread is not None:
            self.thread.join(timeout)
        self.process.stop()

    def run(self) -> None:
        try:
            self.process.start()  # here, not in start(): the node does not wait for it
        except Exception:  # the first job starts it again and reports why it cannot
            log.exception("%s: could not start its synthesis process", self.name)
        while not self._stop.is_set():
            try:
                busy = self.work_once()
            except Exception:  # never let a worker thread die (e.g. the database is locked)
                log.exception("%s: could not claim or update a job; retrying", self.name)
                busy = False
            if not busy:
                self._stop.wait(0.2)

    def work_once(self) -> bool:
        """Claim and handle one due job; False when there was none."""
        job = self.queue.claim()
        if job is None:
            return False
        try:
            if job.state == states.RUNNING:
                job = self.synthesize(job)
            if job.state == states.SENDING:
                self.deliver(job)
        except states.JobChanged as changed:
            log.info("job %d: %s", job.id, changed.reason)
        except SynthesisCrashed as crashed:
            if self._stop.is_set() and isinstance(self.process, RemoteSynthesis):
                log.info("job %d: %s", job.id, crashed.reason)
                return True  # it stays running; the next start dispatches it again (recover)
            log.error("job %d: %s", job.id, crashed.reason)
            if self.metrics is not None:
                self.metrics.worker_crashes.inc()
            if self.audit is not None:
                self.audit.record("worker.crashed", outcome="failure", reason=crashed.reason,
                                  job_id=job.id, study_uid=job.study_uid)
            self._retry_or_fail(job, crashed.reason)
        except Exception as exc:  # the job carries the reason
            log.exception("job %d: unexpected error", job.id)
            self._retry_or_fail(job, f"internal error: {type(exc).__name__}: {exc}")
        return True

    # -- synthesis ----------------------------------------------------------------------------

    def synthesize(self, job: Job) -> Job:
        out = output_folder(self.settings.storage.root, job.id)  # emptied by process.run
        started = time.perf_counter()
        log.info("job %d running: model %s (route %s)", job.id, job.model or "default",
                 job.route or "-")
        try:
            extra: dict[str, list[Path]] = {}
            if job.inputs:  # exactly the instances the job was created with
                files = {r: self.spool.files_of(contents) for r, contents in job.inputs.items()}
                t1w, t2w = files.pop("t1w"), files.pop("t2w", None)
                extra = files
            else:  # a job created before inputs were recorded (schema version < 3)
                t1w = self.spool.series_files(job.t1w_series_uid or "")
                t2w = self.spool.series_files(job.t2w_series_uid or "")
            earlier = superseded(self.queue, job)
        except (config.InputError, config.ModelError, config.ConfigError) as exc:
            log.error("job %d failed: %s", job.id, exc)
            return self.queue.fail(job.id, str(exc), expected=(states.RUNNING,))
        done = self.process.run(Request(job.id, t1w, t2w, out, model=job.model or "default",
                                        enforce=not job.forced, supersedes=earlier,
                                        extra=extra))
        if done.kind == "rejected":
            log.warning("job %d rejected: %s", job.id, done.reason)
            reason = done.reason + self._notify(job, done.notice)
            result = json.loads((out / "result.json").read_text()) if (
                out / "result.json").is_file() else {}
            return self.queue.fail(job.id, reason, state=states.REJECTED,
                                   expected=(states.RUNNING,), result=result)
        if done.kind == "failed":
            log.error("job %d failed: %s", job.id, done.reason)
            return self.queue.fail(job.id, done.reason, expected=(states.RUNNING,))
        if done.kind == "error":
            log.error("job %d: synthesis failed: %s\n%s", job.id, done.reason, done.details)
            self._retry_or_fail(job, f"internal error: {done.reason}")
            return self.queue.get(job.id)
        outputs = done.objects
        self.queue.record_outputs(job.id, outputs)
        summary = dict(done.summary)
        summary["processing_s"] = round(time.perf_counter() - started, 3)
        if self.metrics is not None:
            self.metrics.synthesis.observe(summary["processing_s"])
        summary["device"] = done.device
        summary["output_folder"] = str(out)
        if self.audit is not None:
            self.audit.record("job.synthesized", job_id=job.id, study_uid=job.study_uid,
                              model=job.model, count=len(outputs),
                              model_version=str(summary["model"].get("weights_sha256", ""))[:16],
                              duration_s=summary["processing_s"],
                              worker=summary.get("worker"))
        decision = summary.get("institution") or {}
        log.info("job %d synthesized in %.1f s on %s%s: institution %s; %s; %s; %d objects",
                 job.id, summary["processing_s"], done.device,
                 f" by worker {summary['worker']}" if summary.get("worker") else "",
                 decision.get("institution") or f"external (closest {decision.get('closest')})",
                 (summary.get("edm") or {}).get("line", "EDM -"),
                 (summary.get("verdict") or {}).get("line", "no verdict"), len(outputs))
        destinations = ", ".join(job.destinations) or "no destination"
        replaces = (summary.get("outputs") or {}).get("supersedes")
        if replaces:
            log.info("job %d: its synthetic series supersedes %s, sent %s (%s)", job.id,
                     replaces["series_uid"], replaces["when"], replaces["change"])
        return self.queue.complete(job.id, states.SENDING,
                                   f"{len(outputs)} objects written"
                                   + (f" (superseding the synthetic series of {replaces['when']}"
                                      f": {replaces['change']})" if replaces else "")
                                   + f"; sending to {destinations}",
                                   expected=(states.RUNNING,), result=summary)

    def _notify(self, job: Job, notice: Any) -> str:
        """Send a refusal notice (planning.refusal_notice) to the job's destinations, once,
        best effort; returns what to add to the job's reason."""
        if notice is None or not job.destinations:
            return ""
        output = states.Output(notice.sop_instance_uid, notice.path, notice.sop_class_uid,
                               notice.transfer_syntax_uid)
        self.queue.record_outputs(job.id, [notice])
        told, problems = [], []
        for name in job.destinations:
            destination = self.settings.destinations.get(name)
            if destination is None:
                continue
            try:
                send([output], destination, name, calling_ae=self.settings.dicom.ae_title,
                     timeouts=self.settings.dicom.timeouts,
                     on_sent=lambda uid, name=name: self.queue.record_delivery(job.id, name, uid))
                told.append(name)
            except config.PeerError as exc:
                problems.append(exc.reason)
        return "".join([f"; refusal notice sent to {', '.join(told)}" if told else "",
                        f"; refusal notice not sent: {'; '.join(problems)}" if problems else ""])

    # -- delivery -----------------------------------------------------------------------------

    def deliver(self, job: Job) -> Job:
        outputs = self.queue.outputs(job.id)
        problems: list[str] = []
        # storage commitments asked and not yet reported: (what, when to ask again, transaction)
        waiting: list[tuple[str, float, str]] = []
        for name in job.destinations:
            destination = self.settings.destinations.get(name)
            if destination is None:
                return self.queue.fail(job.id, f"destination {name!r} is no longer configured",
                                       expected=(states.SENDING,))
            delivered = self.queue.delivered(job.id, name)
            earlier = self.queue.delivered_anywhere(
                name, [o.sop_instance_uid for o in outputs if o.sop_instance_uid not in delivered])
            for uid in earlier:  # the same object, delivered for an earlier job
                self.queue.record_delivery(job.id, name, uid)
            if earlier:
                log.info("job %d: %d object(s) already at %s (delivered for an earlier job); "
                         "not sent again", job.id, len(earlier), name)
            pending = [o for o in outputs
                       if o.sop_instance_uid not in delivered | earlier]
            if not pending and not destination.storage_commitment:
                continue

            def sent(uid: str, name: str = name, destination: Any = destination) -> None:
                self.queue.record_delivery(job.id, name, uid)
                if self.metrics is not None:
                    self.metrics.deliveries.labels(name).inc()
                if self.audit is not None:
                    self.audit.record("instance.sent", job_id=job.id, sop_instance_uid=uid,
                                      destination=name, called_ae=destination.ae_title)

            try:
                if pending:
                    count = send(pending, destination, name,
                                 calling_ae=self.settings.dicom.ae_title,
                                 timeouts=self.settings.dicom.timeouts, on_sent=sent)
                    log.info("job %d: %d objects sent to %s", job.id, count, name)
                if destination.storage_commitment:
                    wait, problem = self._commitment(job, name, destination, outputs)
                    if wait is not None:
                        waiting.append(wait)
                    if problem is not None:
                        problems.append(problem)
            except config.PeerError as exc:
                problems.append(exc.reason)
                self._count_failure(name)
            except Exception as exc:  # a missing output file, a refused context: retried too
                log.exception("job %d: sending to %s failed", job.id, name)
                problems.append(f"sending to {name} failed: {type(exc).__name__}: {exc}")
                self._count_failure(name)
        if waiting and not problems:
            held = self.queue.retry(job.id, states.SENDING, f"{len(outputs)} objects delivered; "
                                    + "; ".join(text for text, _, _ in waiting),
                                    max(0.0, min(due for _, due, _ in waiting) - time.time()),
                                    expected=(states.SENDING,))
            # a report that arrived while the job was being put back must not wait for it
            if any(getattr(self.commitments.get(uid), "state", None) != commitment.PENDING
                   for _, _, uid in waiting):
                self.queue.wake(job.id)
            return held
        if not problems:
            result = dict(job.result)
            result["delivered_at"] = time.time()
            committed = [n for n in job.destinations
                         if self.settings.destinations[n].storage_commitment]
            if committed:
                result["commitments"] = {
                    n: self.commitments.latest(job.id, n).transaction_uid  # type: ignore[union-attr]
                    for n in committed}
            return self.queue.complete(job.id, states.DONE,
                                       f"{len(outputs)} objects delivered to "
                                       f"{', '.join(job.destinations) or 'no destination'}"
                                       + (f"; committed by {', '.join(committed)}"
                                          if committed else ""),
                                       expected=(states.SENDING,), result=result)
        reason = "; ".join(problems)
        age = time.time() - (job.sending_since or time.time())
        limit = self.settings.jobs.send_max_age_s
        if age >= limit:
            return self.queue.fail(job.id, f"{reason}; gave up after {age:.0f} s "
                                           f"(jobs.send_max_age_s is {limit:.0f})",
                                   expected=(states.SENDING,))
        attempt = delivery_attempt(self.queue.transitions(job.id))
        # the last try falls on the deadline, not a backoff after it
        delay = min(states.backoff_s(attempt, self.settings.jobs.retry_initial_s,
                                     self.settings.jobs.retry_max_s), limit - age)
        log.warning("job %d: %s; retrying in %.0f s", job.id, reason, delay)
        return self.queue.retry(job.id, states.SENDING, f"{reason}{RETRYING}{delay:.0f} s",
                                delay, expected=(states.SENDING,))

    def _commitment(self, job: Job, name: str, destination: config.Destination,
                    outputs: list[states.Output]
                    ) -> tuple[tuple[str, float, str] | None, str | None]:
        """Where the job's storage commitment with ``destination`` stands, once every output
        was delivered there: ((what the job waits for, when to give up waiting, the
        transaction), None), (None, a problem to retry on), or (None, None) when the peer
        committed them all. Asks (again) when no request is open."""
        latest = self.commitments.latest(job.id, name)
        if latest is not None and latest.state == commitment.COMMITTED:
            if latest.count == len(outputs):
                return None, None
            latest = None  # outputs changed since (a rerun): ask for the new set
        if latest is not None and latest.state == commitment.PENDING:
            age = time.time() - latest.requested_at
            if age < destination.commitment_timeout_s:
                return (f"waiting for {name}'s storage commitment report (transaction "
                        f"{latest.transaction_uid}, asked {age:.0f} s ago)",
                        latest.requested_at + destination.commitment_timeout_s,
                        latest.transaction_uid), None
            self.commitments.supersede(latest.transaction_uid)
            return None, (f"{name} sent no storage commitment report within "
                          f"{destination.commitment_timeout_s:.0f} s (transaction "
                          f"{latest.transaction_uid}); asking again")
        if latest is not None and latest.state == commitment.FAILED:
            self.commitments.supersede(latest.transaction_uid)
            self.queue.forget_deliveries(name, [uid for uid, _ in latest.failures])
            return None, (f"{name} did not commit {latest.describe_failures()}; sending them "
                          "again")
        transaction_uid = commitment.request(
            outputs, destination, name, calling_ae=self.settings.dicom.ae_title,
            timeouts=self.settings.dicom.timeouts, ledger=self.commitments, job_id=job.id)
        log.info("job %d: asked %s to commit %d objects (transaction %s)", job.id, name,
                 len(outputs), transaction_uid)
        return (f"waiting for {name}'s storage commitment report (transaction "
                f"{transaction_uid})", time.time() + destination.commitment_timeout_s,
                transaction_uid), None

    def _count_failure(self, destination: str) -> None:
        if self.metrics is not None:
            self.metrics.delivery_failures.labels(destination).inc()

    def _retry_or_fail(self, job: Job, reason: str) -> None:
        current = self.queue.get(job.id)
        if current.state not in (states.RUNNING, states.SENDING):
            return  # it ended (or was cancelled) before the error: leave it as it is
        if current.attempts >= self.settings.jobs.max_attempts:
            self.queue.fail(job.id, f"{reason} (after {current.attempts} attempts)",
                            expected=(current.state,))
            return
        delay = states.backoff_s(current.attempts, self.settings.jobs.retry_initial_s,
                                 self.settings.jobs.retry_max_s)
        state = states.SENDING if current.state == states.SENDING else states.READY
        self.queue.retry(job.id, state, f"{reason}{RETRYING}{delay:.0f} s", delay,
                         expected=(current.state,))
