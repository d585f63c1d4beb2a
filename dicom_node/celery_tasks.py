"""``vcemri worker``: the Celery worker that synthesizes the node's jobs (``jobs.backend:
celery``), and the task it runs.

How inputs reach a worker: a **shared spool path**. The worker mounts the node's
``storage.root`` (NFS or SMB, read-write; it may be mounted at another path, since a task names
its files relative to ``storage.root``), reads the job's spooled instances there and writes
the outputs to ``outputs/job-NNNNNN`` there, where the node delivers them from. The worker
never opens the node's SQLite database (SQLite's locking is not safe over a network file
system): the node keeps every job state, the worker only returns what it did.

A task may run more than once (acks late: a worker that died mid-task, a broker that lost an
acknowledgement). Each run writes into its own staging folder under ``outputs/.staging``
(named with a random token: a task delivered twice has one id) and
renames it into place only if no other run got there first (a rename onto a folder that holds
files fails), so a late duplicate never overwrites files the node may be sending; by
construction both runs wrote the same objects (UIDs from the inputs and the model).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import traceback
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import config

from . import broker

if TYPE_CHECKING:
    import planning
    from synthesis import WrittenObject

log = logging.getLogger(__name__)

#: Set by :func:`run_worker` before the pool starts; pool processes inherit it.
_SETTINGS: config.Settings | None = None
_SERVICE: planning.SynthesisService | None = None


def relative(path: Path, root: Path) -> str:
    """``path`` relative to the storage root, as a task names it."""
    return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()


def inside(root: Path, name: str, folder: str = "") -> Path:
    """The file a task names, under this machine's storage root (and its ``folder``); a name
    that leaves it (absolute, ``..``) is refused: a message on the broker must not reach
    other files."""
    base = (Path(root) / folder).resolve()
    candidate = (Path(root) / name).resolve()
    if Path(name).is_absolute() or candidate == base or not candidate.is_relative_to(base):
        raise config.InputError(f"the task names {name!r}, outside the storage root's "
                                f"{folder or 'folder'}")
    return candidate


def reroot(value: Any, old: str, new: str) -> Any:
    """``value`` (JSON-like) with every string that starts with the folder ``old`` moved
    under ``new`` (a summary's output paths, from a staging folder or another mount point)."""
    if isinstance(value, str):
        if value == old or value.startswith(old.rstrip("/") + "/"):
            return new.rstrip("/") + value[len(old.rstrip("/")):]
        return value
    if isinstance(value, dict):
        return {k: reroot(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [reroot(v, old, new) for v in value]
    return value


def _object(written: WrittenObject, root: Path, staging: Path, final: Path) -> dict[str, Any]:
    values = asdict(written)
    values["path"] = relative(final / Path(written.path).relative_to(staging), root)
    return values


def _service() -> planning.SynthesisService:
    global _SERVICE
    if _SERVICE is None:
        import planning

        assert _SETTINGS is not None, "run_worker sets the settings"
        _SERVICE = planning.SynthesisService(_SETTINGS)
    return _SERVICE


def preload() -> None:
    """Load the default model in a new pool process, before its first task."""
    try:
        if _SETTINGS is not None and "default" in _SETTINGS.models:
            _service().synthesizer("default")
    except Exception:  # the first task that needs it says why it cannot
        log.debug("default model not preloaded", exc_info=True)


def synthesize(request: dict[str, Any], *, task_id: str, worker: str) -> dict[str, Any]:
    """Run one study (``request``: the node's ``remote.encode``) on this machine; returns
    the outcome as JSON (``remote.decode`` reads it)."""
    import synthesis

    assert _SETTINGS is not None
    root = Path(_SETTINGS.storage.root).resolve()
    answer: dict[str, Any] = {"worker": worker, "pid": os.getpid(),
                              "storage_root": str(root), "objects": [], "notice": None,
                              "summary": {}, "device": "", "reason": "", "details": "",
                              "duplicate": False}
    job = int(request["job_id"])
    # its own folder for each run, even of one task delivered twice (the same task id)
    staging = root / "outputs" / ".staging" / f"job-{job:06d}.{uuid.uuid4().hex}"
    try:
        if request["out"] != f"outputs/job-{job:06d}":
            raise config.InputError(f"the task's output folder {request['out']!r} is not job "
                                    f"{job}'s")
        final = inside(root, request["out"])
        t1w = [inside(root, name, "spool") for name in request["t1w"]]
        t2w = (None if request.get("t2w") is None
               else [inside(root, name, "spool") for name in request["t2w"]])
        extra = {role: [inside(root, name, "spool") for name in names]
                 for role, names in (request.get("extra") or {}).items()}
        supersedes = None
        if request.get("supersedes"):
            import planning

            supersedes = planning.Supersedes(**request["supersedes"])
        missing = [p for p in [*t1w, *(t2w or []), *(f for fs in extra.values() for f in fs)]
                   if not p.is_file()]
        if missing:
            raise config.InputError(
                f"{len(missing)} input file(s) of job {job} are not under this worker's "
                f"storage.root {root} (e.g. {relative_or_name(missing[0], root)}): mount the "
                "node's storage there")
        log.info("job %d: synthesizing on %s (model %s, task %s)", job, worker,
                 request["model"], task_id)
        try:
            done = _service().process(t1w, t2w, staging, model=request["model"],
                                      enforce=bool(request.get("enforce", True)),
                                      supersedes=supersedes, extra_files=extra)
        except synthesis.RejectedStudy as rejected:
            answer.update(kind="rejected", reason=rejected.reason)
            notice = getattr(rejected, "notice", None)
            _publish(staging, final, answer)
            if notice is not None:
                answer["notice"] = _object(notice, root, staging, final)
            return answer
        summary = reroot(done.summary, str(staging), str(final))
        answer.update(kind="done", summary=summary, device=done.device,
                      objects=[_object(o, root, staging, final) for o in done.objects])
        _publish(staging, final, answer)
        return answer
    except (config.InputError, config.ModelError, config.ConfigError) as exc:
        answer.update(kind="failed", reason=str(exc))
    except Exception as exc:  # may pass on a retry (e.g. CUDA out of memory)
        answer.update(kind="error", reason=f"{type(exc).__name__}: {exc}",
                      details=traceback.format_exc())
    shutil.rmtree(staging, ignore_errors=True)
    return answer


def relative_or_name(path: Path, root: Path) -> str:
    try:
        return relative(path, root)
    except ValueError:
        return path.name


def _publish(staging: Path, final: Path, answer: dict[str, Any]) -> None:
    """Move a run's staging folder into place (its result.json naming the final folder),
    unless another run of the task got there first (then this run's identical files are
    dropped and ``answer`` says so)."""
    if (staging / "result.json").is_file():
        result = json.loads((staging / "result.json").read_text())
        (staging / "result.json").write_text(
            json.dumps(reroot(result, str(staging), str(final)), indent=1))
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staging, final)
    except OSError:  # the folder holds another run's files: keep those
        shutil.rmtree(staging, ignore_errors=True)
        answer["duplicate"] = True
        log.info("%s: another run of this job wrote its outputs first; this run's identical "
                 "files were dropped", final.name)


def register(app: Any) -> Any:
    """Add the synthesis task to ``app`` (the node sends it by name: ``broker.TASK``)."""

    @app.task(name=broker.TASK, bind=True)
    def task(self: Any, request: dict[str, Any]) -> dict[str, Any]:
        return synthesize(request, task_id=str(self.request.id),
                          worker=str(self.request.hostname))

    return task


def worker_queues(settings: config.Settings, asked: str | None) -> list[str]:
    """The queues a worker consumes: ``asked`` (``cpu``, ``gpu`` or ``cpu,gpu``), else ``gpu``
    and ``cpu`` where a CUDA device is present and ``cpu`` elsewhere. A worker without a GPU
    is refused the ``gpu`` queue."""
    import torch

    cuda = torch.cuda.is_available()
    classes = ([c.strip() for c in asked.split(",") if c.strip()] if asked
               else [broker.GPU, broker.CPU] if cuda else [broker.CPU])
    unknown = sorted(set(classes) - {broker.CPU, broker.GPU})
    if unknown:
        raise config.InputError(f"unknown queue(s) {', '.join(unknown)}: use cpu, gpu or "
                                "cpu,gpu")
    if broker.GPU in classes and not cuda:
        raise config.InputError("this machine has no CUDA device: a worker without a GPU "
                                "cannot take the gpu queue (jobs of models on cuda)")
    return [broker.queue_name(settings, c) for c in classes]


def run_worker(settings: config.Settings, *, concurrency: int = 1, queues: str | None = None,
               name: str | None = None, loglevel: str = "INFO") -> int:
    """Run a Celery worker for the node's jobs until SIGTERM (finishes its tasks) or SIGINT."""
    from celery.signals import worker_process_init

    global _SETTINGS
    if settings.jobs.backend != "celery":
        raise config.ConfigError("configuration", [
            "jobs.backend: is sqlite, so the node synthesizes its jobs itself and sends no "
            "task to workers; set jobs.backend: celery (node and workers) to use vcemri worker"])
    root = Path(settings.storage.root)
    if not (root / "spool").is_dir():
        raise config.InputError(
            f"storage.root {root} holds no node spool: mount the node's storage.root here "
            "(the shared spool path) before starting a worker")
    names = worker_queues(settings, queues)
    os.umask(0o077)  # outputs as private as the node's own (storage_lock.private_storage)
    _SETTINGS = settings
    app = broker.celery_app(settings, worker=True)
    register(app)
    worker_process_init.connect(lambda **_: preload(), weak=False)
    hostname = name or f"vcemri-{os.getpid()}@{socket.gethostname()}"
    log.info("vcemri worker %s: queues %s, concurrency %d, broker %s, storage %s",
             hostname, ", ".join(names), concurrency,
             broker.redacted(settings.jobs.celery.broker_url), root)
    app.worker_main(["worker", "--hostname", hostname, "--concurrency", str(concurrency),
                     "--queues", ",".join(names), "--pool", "prefork", "--loglevel", loglevel,
                     "--without-gossip", "--without-mingle"])
    return 0
