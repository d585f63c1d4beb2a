"""The node: SCP + spool + assembler + workers, started and stopped together.

Start-up takes the storage folder's lock (one node per folder; storage_lock.py) and makes
what the node writes private, then recovers what a previous process left: temporary spool
files are removed (their instances were never acknowledged), series still being received get
a full idle period again (the downtime is not their senders' silence), ``running`` jobs become
``ready`` again (their node is gone: it held the lock), ``sending`` jobs become due. Stopping
closes the listening socket first, lets in-flight C-STOREs finish their writes, then lets each
worker finish or abandon its job (an abandoned job resumes at the next start), and releases
the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import config

from .assembly import Assembler
from .broker import WorkerHealth, node_app, workers
from .commitment import CommitmentLedger, CommitmentReports
from .jobs import JobQueue
from .metrics import Metrics
from .retention import DAY_S, PURGE_EVERY_S, SPACE_CHECK_EVERY_S, purge, purge_for_space
from .scp import StorageSCP
from .spool import Spool
from .storage_lock import StorageLock, private_storage
from .web import WebServer
from .worker import Worker

log = logging.getLogger(__name__)

TICK_S = 0.25

#: How often the node asks which Celery workers are up (jobs.backend celery; seconds).
WORKERS_EVERY_S = 15.0


class Node:
    """A running vcemri node for ``settings``; use :meth:`start` and :meth:`stop` (or ``with``)."""

    def __init__(self, settings: config.Settings, *, workers: int | None = None) -> None:
        self.settings = settings
        self.root = Path(settings.storage.root)
        # Before anything touches the storage: private files, and one node per folder (the
        # lock is held until stop(), or until the process dies).
        private_storage(self.root)
        self.lock = StorageLock(self.root).acquire()
        try:
            self.audit = config.AuditLog(settings.storage.audit_log_path)
            self.spool = Spool(settings)
            self.queue = JobQueue(self.root, self.audit)
            self.assembler = Assembler(settings, self.queue, self.audit)
            self.metrics = Metrics(self.queue, self.spool)
            self.commitments = CommitmentLedger(self.root)
            self.scp = StorageSCP(settings, self.spool, self.audit, self.metrics,
                                  reports=CommitmentReports(self.commitments, self.queue,
                                                            self.audit))
            # with Celery, each thread follows one job on the workers (jobs.celery.in_flight)
            count = (workers if workers is not None else settings.jobs.celery.in_flight
                     if settings.jobs.backend == "celery" else settings.jobs.workers)
            self.workers = [Worker(settings, self.queue, self.spool, self.audit,
                                   name=f"worker-{i + 1}", metrics=self.metrics,
                                   commitments=self.commitments)
                            for i in range(count)]
            self.web = None if settings.web is None else WebServer(self)
            self.celery_app = (node_app(settings) if settings.jobs.backend == "celery"
                               else None)
        except BaseException:
            self.lock.release()
            raise
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        #: jobs.backend celery: the workers that answered last (``broker.WorkerHealth``), or
        #: why none could be asked; refreshed every WORKERS_EVERY_S for the dashboard
        self.celery_workers: list[WorkerHealth] | str | None = None
        self._watcher: threading.Thread | None = None

    def start(self) -> Node:
        self.spool.restart_idle_clocks()
        recovered = self.queue.recover()
        if recovered:
            log.info("resuming %d interrupted job(s): %s", len(recovered),
                     ", ".join(map(str, recovered)))
        self.scp.start()
        if self.web is not None:
            self.web.start()
        self.audit.record("node.started", called_ae=self.settings.dicom.ae_title,
                          listen_port=self.scp.port, count=len(recovered))
        self._ticker = threading.Thread(target=self._tick_loop, name="assembler", daemon=True)
        self._ticker.start()
        for worker in self.workers:
            worker.start()
        if self.settings.jobs.backend == "celery":
            self._watcher = threading.Thread(target=self._watch_workers, name="celery-workers",
                                             daemon=True)
            self._watcher.start()
        return self

    def _watch_workers(self) -> None:
        while not self._stop.is_set():
            try:
                self.celery_workers = workers(self.settings, app=self.celery_app)
            except config.PeerError as exc:
                self.celery_workers = exc.reason
            except Exception as exc:  # the dashboard says so; the node goes on
                self.celery_workers = f"the workers could not be asked: {exc}"
            self._stop.wait(WORKERS_EVERY_S)

    def _tick_loop(self) -> None:
        purged_at = checked_at = -float("inf")
        while not self._stop.is_set():
            try:
                self.assembler.tick()
            except Exception:  # keep assembling; the log says what went wrong
                log.exception("series assembly failed; retrying")
            storage = self.settings.storage
            if storage.retention_days and time.monotonic() - purged_at >= PURGE_EVERY_S:
                purged_at = time.monotonic()
                try:
                    purge(self.queue, self.spool, storage.retention_days * DAY_S,
                          audit=self.audit)
                except Exception:  # retention must never stop the node
                    log.exception("retention purge failed; trying again in an hour")
            if (storage.retention_free_mib
                    and time.monotonic() - checked_at >= SPACE_CHECK_EVERY_S):
                checked_at = time.monotonic()
                try:
                    if self.spool.free_mib() < storage.retention_free_mib:
                        purge_for_space(self.queue, self.spool, storage.retention_free_mib,
                                        audit=self.audit)
                except Exception:  # retention must never stop the node
                    log.exception("free-space purge failed; trying again in a minute")
            self._stop.wait(TICK_S)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting, finish in-flight writes, stop the workers (waiting up to
        ``timeout_s`` for a job in progress)."""
        self.scp.stop()
        if self.web is not None:
            self.web.stop()
        self._stop.set()
        for worker in self.workers:
            worker.stop()
        for worker in self.workers:
            worker.join(timeout_s)
        if self._ticker is not None:
            self._ticker.join(5.0)
        self.audit.record("node.stopped", called_ae=self.settings.dicom.ae_title)
        self.lock.release()

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
