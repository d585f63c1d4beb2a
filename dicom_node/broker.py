"""The Celery application of ``jobs.backend: celery``: broker, queues and worker health.

One function builds the app from the settings, so that the node (which sends tasks) and every
``vcemri worker`` (which runs them) agree on the broker, the serializer and the delivery
semantics:

- **acks late**: a task is acknowledged after it ran, not when a worker took it; a worker that
  dies mid-task (``kill -9``, the machine lost) leaves the task unacknowledged, and the broker
  gives it to another worker after ``jobs.celery.visibility_timeout_s`` (Redis) or at once when
  the connection drops (RabbitMQ). A pool process that dies while its worker lives (a native
  crash, the out-of-memory killer) fails that run (``WorkerLostError``), and the node retries
  the job with backoff up to ``jobs.max_attempts`` as it does a crash of local synthesis: a
  study that crashes every process it touches is not requeued for ever.
- **one task at a time per pool process** (prefetch 1), so that a busy worker does not hold
  tasks an idle one could run.
- **JSON only**: no pickle, so a message on the broker can never run code in a worker.

Queues per device class: ``<prefix>.cpu`` for models on ``cpu`` or ``auto`` (any worker) and
``<prefix>.gpu`` for models on ``cuda`` (only workers with a CUDA device consume it).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import config

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

#: The name of the synthesis task (``celery_tasks.synthesize``).
TASK = "vcemri.synthesize"

CPU, GPU = "cpu", "gpu"


def queue_name(settings: config.Settings, device_class: str) -> str:
    """The Celery queue of a device class (``cpu`` or ``gpu``)."""
    return f"{settings.jobs.celery.queue_prefix}.{device_class}"


def device_class(settings: config.Settings, model: str) -> str:
    """``gpu`` for a model configured on CUDA, else ``cpu`` (``auto`` runs on any worker)."""
    choice = settings.models.get(model)
    return GPU if choice is not None and str(choice.device).startswith("cuda") else CPU


def redacted(url: str) -> str:
    """A broker URL fit for a log line (its password masked)."""
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def celery_app(settings: config.Settings, name: str = "vcemri",
               worker: bool = False) -> Celery:
    """The Celery app for ``settings.jobs.celery`` (raises ``ConfigError`` when Celery is not
    installed). ``worker``: a worker's app, which retries storing a result for as long as the
    backend is down; the node's raises at once, so that it can say the broker is down and
    still notice a cancel or its own stop."""
    try:
        from celery import Celery
    except ImportError as exc:
        raise config.ConfigError("configuration", [
            "jobs.backend: celery needs the Celery package: pip install 'vcemri[scale-out]'"
        ]) from exc
    options = settings.jobs.celery
    visibility = float(options.visibility_timeout_s)
    app = Celery(name, broker=options.broker_url,
                 backend=options.result_backend or options.broker_url,
                 set_as_current=False)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=False, worker_prefetch_multiplier=1,
        task_track_started=True, task_default_queue=queue_name(settings, CPU),
        # Redis: how long an unacknowledged task waits for its worker before another takes it,
        # and a sweep for such tasks often enough for that timeout
        broker_transport_options={
            "visibility_timeout": visibility,
            "unacked_restore_interval": max(1, min(10, int(visibility / 10))),
            "unacked_restore_throttle": 1,
            # the lock a worker holds while it sweeps: kombu's 300 s default kept every other
            # worker from handing on a dead worker's task for 5 minutes when the worker was
            # killed mid-sweep (seen in the tests); a sweep takes milliseconds
            "unacked_mutex_expire": max(5, min(300, int(visibility / 2))),
        },
        result_expires=max(86400, int(options.task_timeout_s) * 2),
        result_extended=True,
        # a broker restart: reconnect for ever, never drop what is running
        broker_connection_retry=True, broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None, result_backend_always_retry=worker,
        result_backend_max_retries=1_000_000 if worker else 0,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # our logging setup (the PHI filter, --log-format json) stays in charge
        worker_hijack_root_logger=False, worker_redirect_stdouts=False,
        broker_channel_error_retry=True, worker_enable_remote_control=True,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 20, "interval_start": 0.5,
                                   "interval_step": 0.5, "interval_max": 3.0},
    )
    return app


_NODE_APPS: dict[tuple[str, str | None, str], Any] = {}
_NODE_APPS_LOCK = threading.Lock()


def node_app(settings: config.Settings) -> Celery:
    """The node's Celery app for these broker settings, one per process, built and finalised
    on first use (call it from the thread that builds the node: Celery's lazy modules and an
    app's first use are not safe to race from several threads)."""
    options = settings.jobs.celery
    key = (options.broker_url, options.result_backend, options.queue_prefix)
    with _NODE_APPS_LOCK:
        if key not in _NODE_APPS:
            app = celery_app(settings)
            app.finalize(auto=True)
            _ = app.amqp, app.backend
            _NODE_APPS[key] = app
        return _NODE_APPS[key]


@dataclass(frozen=True)
class WorkerHealth:
    """A Celery worker as the node sees it: its name, the queues it consumes, the jobs it
    runs (job ids), and its pool's concurrency."""

    name: str
    queues: list[str] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    concurrency: int | None = None

    def line(self) -> str:
        busy = (f"running job {', '.join(map(str, self.running))}" if self.running
                else "idle")
        return (f"{self.name}: up, queues {', '.join(self.queues) or '-'}, "
                f"concurrency {self.concurrency or '-'}, {busy}")


def workers(settings: config.Settings, timeout_s: float = 1.0,
            app: Celery | None = None) -> list[WorkerHealth]:
    """The workers that answer within ``timeout_s`` (raises ``config.PeerError`` when the
    broker cannot be reached)."""
    app = app or node_app(settings)
    try:
        inspector = app.control.inspect(timeout=timeout_s)
        queues: dict[str, Any] = inspector.active_queues() or {}
        active: dict[str, Any] = inspector.active() or {}
        stats: dict[str, Any] = inspector.stats() or {}
    except Exception as exc:  # kombu's OperationalError, redis' ConnectionError ...
        raise config.PeerError(
            f"the broker {redacted(settings.jobs.celery.broker_url)} cannot be reached: "
            f"{type(exc).__name__}: {exc}") from exc
    found = []
    for name in sorted(set(queues) | set(active) | set(stats)):
        running = []
        for task in active.get(name) or []:
            job = (task.get("kwargs") or {}).get("request", {}).get("job_id")
            if job is not None:
                running.append(int(job))
        pool = (stats.get(name) or {}).get("pool") or {}
        found.append(WorkerHealth(
            name, sorted(q["name"] for q in queues.get(name) or []), sorted(running),
            pool.get("max-concurrency")))
    return found
