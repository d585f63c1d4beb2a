"""Workers: a ``ready`` job is synthesized and written, then a ``sending`` job is delivered.

Outcomes, each with a reason in the job, the log and the audit log:
- screening refuses the study -> ``rejected``;
- bad input or an unusable model (``InputError``, ``ModelError``) -> ``failed`` at once
  (retrying cannot help);
- anything else -> retried with exponential backoff up to ``jobs.max_attempts``, then ``failed``;
- a destination that is down -> ``sending`` again after a backoff, until
  ``jobs.send_max_age_s`` has passed since sending began -> ``failed``.

Output UIDs depend only on the inputs and the model (``planning``), so a job that runs twice
(after a crash, or retried by an administrator) writes the same objects and the TPS never
receives a duplicate series.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from typing import Any

import config
import planning

from . import jobs as states
from .jobs import Job, JobQueue, output_folder
from .lineage import superseded
from .metrics import Metrics
from .sender import send
from .spool import Spool

log = logging.getLogger(__name__)


class Worker:
    """Processes jobs from the queue until :meth:`stop`; run several for parallel jobs."""

    def __init__(self, settings: config.Settings, queue: JobQueue, spool: Spool,
                 service: planning.SynthesisService,
                 audit: config.AuditLog | None = None,
                 name: str = "worker", metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.spool = spool
        self.service = service
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

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def run(self) -> None:
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
        except Exception as exc:  # the job carries the reason
            log.exception("job %d: unexpected error", job.id)
            self._retry_or_fail(job, f"internal error: {type(exc).__name__}: {exc}")
        return True

    # -- synthesis ----------------------------------------------------------------------------

    def synthesize(self, job: Job) -> Job:
        import synthesis

        out = output_folder(self.settings.storage.root, job.id)
        if out.exists():
            shutil.rmtree(out)
        started = time.perf_counter()
        log.info("job %d running: model %s (route %s)", job.id, job.model or "default",
                 job.route or "-")
        try:
            if job.inputs:  # exactly the instances the job was created with
                t1w, t2w = (self.spool.files_of(job.inputs[r]) for r in ("t1w", "t2w"))
            else:  # a job created before inputs were recorded (schema version < 3)
                t1w = self.spool.series_files(job.t1w_series_uid or "")
                t2w = self.spool.series_files(job.t2w_series_uid or "")
            earlier = superseded(self.queue, job)
            done = self.service.process(t1w, t2w, out, model=job.model or "default",
                                        enforce=not job.forced, supersedes=earlier)
        except synthesis.RejectedStudy as rejected:
            log.warning("job %d rejected: %s", job.id, rejected.reason)
            reason = rejected.reason + self._notify(job, getattr(rejected, "notice", None))
            result = json.loads((out / "result.json").read_text()) if (
                out / "result.json").is_file() else {}
            return self.queue.fail(job.id, reason, state=states.REJECTED,
                                   expected=(states.RUNNING,), result=result)
        except (config.InputError, config.ModelError, config.ConfigError) as exc:
            log.error("job %d failed: %s", job.id, exc)
            return self.queue.fail(job.id, str(exc), expected=(states.RUNNING,))
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
                              duration_s=summary["processing_s"])
        decision = summary.get("institution") or {}
        log.info("job %d synthesized in %.1f s on %s: institution %s; %s; %s; %d objects",
                 job.id, summary["processing_s"], done.device,
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
        problems = []
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
            if not pending:
                continue

            def sent(uid: str, name: str = name, destination: Any = destination) -> None:
                self.queue.record_delivery(job.id, name, uid)
                if self.metrics is not None:
                    self.metrics.deliveries.labels(name).inc()
                if self.audit is not None:
                    self.audit.record("instance.sent", job_id=job.id, sop_instance_uid=uid,
                                      destination=name, called_ae=destination.ae_title)

            try:
                count = send(pending, destination, name, calling_ae=self.settings.dicom.ae_title,
                             timeouts=self.settings.dicom.timeouts, on_sent=sent)
                log.info("job %d: %d objects sent to %s", job.id, count, name)
            except config.PeerError as exc:
                problems.append(exc.reason)
                self._count_failure(name)
            except Exception as exc:  # a missing output file, a refused context: retried too
                log.exception("job %d: sending to %s failed", job.id, name)
                problems.append(f"sending to {name} failed: {type(exc).__name__}: {exc}")
                self._count_failure(name)
        if not problems:
            result = dict(job.result)
            result["delivered_at"] = time.time()
            return self.queue.complete(job.id, states.DONE,
                                       f"{len(outputs)} objects delivered to "
                                       f"{', '.join(job.destinations) or 'no destination'}",
                                       expected=(states.SENDING,), result=result)
        reason = "; ".join(problems)
        age = time.time() - (job.sending_since or time.time())
        limit = self.settings.jobs.send_max_age_s
        if age >= limit:
            return self.queue.fail(job.id, f"{reason}; gave up after {age:.0f} s "
                                           f"(jobs.send_max_age_s is {limit:.0f})",
                                   expected=(states.SENDING,))
        attempt = len([t for t in self.queue.transitions(job.id) if t["state"] == states.SENDING])
        # the last try falls on the deadline, not a backoff after it
        delay = min(states.backoff_s(attempt, self.settings.jobs.retry_initial_s,
                                     self.settings.jobs.retry_max_s), limit - age)
        log.warning("job %d: %s; retrying in %.0f s", job.id, reason, delay)
        return self.queue.retry(job.id, states.SENDING, f"{reason}; retrying in {delay:.0f} s",
                                delay, expected=(states.SENDING,))

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
        self.queue.retry(job.id, state, f"{reason}; retrying in {delay:.0f} s", delay,
                         expected=(current.state,))
