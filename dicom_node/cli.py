"""``vcemri serve`` and ``vcemri jobs list|show|retry|cancel|purge``."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import signal
import sys
import threading
from typing import Any

import config

from . import jobs as states
from .commitment import CommitmentLedger
from .jobs import Job, JobQueue

log = logging.getLogger(__name__)


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return _dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


#: How long `vcemri serve` waits for running jobs when it is stopped (seconds).
STOP_WAIT_S = 30.0


def _serve(args: argparse.Namespace) -> int:
    from .node import Node

    settings = config.load_settings(args.config)
    if args.log_format == "human" and settings.logging.format == "json":
        config.setup_logging("json", "DEBUG" if args.debug else settings.logging.level)
    node = Node(settings)
    stopping = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stopping.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        node.start()
        dicom = settings.dicom
        # through the logger, so that --log-format json keeps stderr pure JSON lines
        log.info("vcemri node %s listening on %s:%d%s; data in %s; Ctrl-C or SIGTERM stops it",
                 dicom.ae_title, dicom.bind_address, node.scp.port,
                 " (TLS)" if dicom.tls else "", settings.storage.root)
        while not stopping.wait(0.5):
            pass
        running = [job.id for job in node.queue.list(states=(states.RUNNING,))]
        log.info("stopping: no new associations; %s", (
            f"waiting up to {STOP_WAIT_S:.0f} s for running job(s) "
            f"{', '.join(map(str, running))} (cut off, they resume at the next start)"
            if running else "no job is running"))
    finally:
        node.stop(STOP_WAIT_S)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _queue(args: argparse.Namespace) -> JobQueue:
    settings = config.load_settings(args.config)
    root = settings.storage.root
    from .database import database_path

    if not database_path(root).is_file():
        raise config.InputError(f"no node database under {root}; has `vcemri serve` run with "
                                "this configuration?")
    return JobQueue(root, config.AuditLog(settings.storage.audit_log_path))


def _jobs_list(args: argparse.Namespace) -> int:
    queue = _queue(args)
    jobs = queue.list(states=tuple(args.state) if args.state else None, limit=args.limit)
    if args.json:
        print(json.dumps([_as_dict(j) for j in jobs], indent=1))
        return 0
    print(f"{'ID':>6}  {'STATE':<9} {'UPDATED':<19}  {'ROUTE':<10} STUDY / REASON")
    for job in jobs:
        print(f"{job.id:>6}  {job.state:<9} {_when(job.updated_at):<19}  "
              f"{(job.route or '-'):<10} {job.study_uid}")
        if job.reason:
            print(f"{'':>6}  {job.reason}")
    if not jobs:
        print("(no jobs)")
    settings = config.load_settings(args.config)
    if settings.jobs.backend == "celery":
        print("\n".join(_worker_lines(settings)))
    return 0


def _worker_lines(settings: config.Settings) -> list[str]:
    """The Celery workers that answer, one line each (jobs.backend: celery)."""
    from .broker import redacted, workers

    try:
        found = workers(settings)
    except config.PeerError as exc:
        return [f"workers: {exc.reason}"]
    url = redacted(settings.jobs.celery.broker_url)
    if not found:
        return [f"workers: none answered on {url} within 1 s (start `vcemri worker`)"]
    return [f"workers on {url}:"] + [f"  {w.line()}" for w in found]


def _worker(args: argparse.Namespace) -> int:
    from .celery_tasks import run_worker

    settings = config.load_settings(args.config)
    level = "DEBUG" if args.debug else settings.logging.level
    if args.log_format == "human" and settings.logging.format == "json":
        config.setup_logging("json", level)
    return run_worker(settings, concurrency=args.concurrency, queues=args.queues,
                      name=args.name, loglevel=level)


def _as_dict(job: Job) -> dict[str, Any]:
    return {k: getattr(job, k) for k in job.__dataclass_fields__}


def _jobs_show(args: argparse.Namespace) -> int:
    queue = _queue(args)
    job = queue.get(args.id)
    if args.json:
        record = _as_dict(job)
        record["transitions"] = queue.transitions(job.id)
        record["outputs"] = {o.sop_instance_uid: str(o.path) for o in queue.outputs(job.id)}
        print(json.dumps(record, indent=1))
        return 0
    print(f"job {job.id}: {job.state}" + (f" ({job.reason})" if job.reason else ""))
    print(f"study:        {job.study_uid}")
    print(f"T1w series:   {job.t1w_series_uid or '-'}")
    print(f"T2w series:   {job.t2w_series_uid or '-'}")
    if job.inputs and set(job.inputs) != {"t1w", "t2w"}:  # a model reading other series
        print("inputs:       " + ", ".join(f"{role} ({len(contents)} instances)"
                                           for role, contents in job.inputs.items()))
    print(f"route/model:  {job.route or '-'} / {job.model or '-'}; destinations: "
          f"{', '.join(job.destinations) or '-'}")
    print(f"attempts:     {job.attempts}" + ("; forced through screening" if job.forced else ""))
    result = job.result
    if result.get("verdict"):
        print(f"verdict:      {result['verdict']['line']}")
    if result.get("institution"):
        decision = result["institution"]
        print(f"institution:  {decision.get('institution') or 'external'} (closest "
              f"{decision.get('closest')}, confidence {decision.get('confidence')})")
    if result.get("edm"):
        edm = result["edm"]
        # jobs recorded before EDM said whether it applies carry only the factors
        line = edm.get("line") or f"EDM T1w x{edm['t1w']}, T2w x{edm['t2w']}"
        print(f"EDM:          {line}")
    if result.get("output_folder"):
        print(f"outputs:      {result['output_folder']}")
    if result.get("worker"):
        print(f"synthesized:  by Celery worker {result['worker']} on {result.get('device')}")
    elif result.get("celery_task"):
        print(f"Celery task:  {result['celery_task']} on {result.get('queue')}")
    commitments = CommitmentLedger(queue.root)
    for name in job.destinations:
        asked = commitments.latest(job.id, name)
        print(f"delivered to {name}: {len(queue.delivered(job.id, name))} of "
              f"{len(queue.outputs(job.id))}" + (f"; {asked.describe()}" if asked else ""))
    print("history:")
    for step in queue.transitions(job.id):
        print(f"  {_when(step['at'])}  {step['state']:<9} {step['reason'] or ''}")
    return 0


def _jobs_retry(args: argparse.Namespace) -> int:
    import getpass

    from .actions import retry

    job = retry(_queue(args), args.id, getpass.getuser(), force=args.force)
    if args.force:
        print(f"job {job.id} is {job.state} again and forced through screening; a running "
              "node will process it and mark every object refused-but-forced")
    else:
        print(f"job {job.id} is {job.state} again; a running node will process it")
    return 0


def _jobs_cancel(args: argparse.Namespace) -> int:
    import getpass

    from .actions import cancel

    job = cancel(_queue(args), args.id, getpass.getuser())
    print(f"job {job.id} cancelled")
    return 0


def _jobs_purge(args: argparse.Namespace) -> int:
    import getpass

    from .retention import days, purge, purge_for_space
    from .spool import Spool

    settings = config.load_settings(args.config)
    queue = _queue(args)
    spool = Spool(settings, recover=False)
    verb = "would delete" if args.dry_run else "deleted"
    if args.free_mib is not None:
        report = purge_for_space(queue, spool, args.free_mib, audit=queue.audit,
                                 user=getpass.getuser(), dry_run=args.dry_run)
        which = (f"{len(report.jobs)} finished job(s), oldest first, for {args.free_mib:g} MiB "
                 f"free ({report.free_before_mib:.0f} MiB free before, "
                 f"{report.free_after_mib:.0f} {'would be' if args.dry_run else 'now'})")
    else:
        report = purge(queue, spool, days(args.older_than), audit=queue.audit,
                       user=getpass.getuser(), dry_run=args.dry_run)
        which = f"{len(report.jobs)} finished job(s) older than {args.older_than} days"
    print(f"{which}: {verb} {report.instances} spooled instances and {report.output_files} "
          f"output files ({report.bytes / 2**20:.1f} MiB)" + (
              f"; jobs {', '.join(map(str, report.jobs))}" if report.jobs else ""))
    if args.free_mib is not None and (report.free_after_mib or 0) < args.free_mib:
        print(f"free space stays below {args.free_mib:g} MiB: no finished job is left to purge "
              "(unfinished jobs are never purged)", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    import shutil
    import time

    from .storage_lock import holder

    settings = config.load_settings(args.config)
    root = settings.storage.root
    pid = holder(root)
    running = pid is not None
    web = settings.web
    lines = [f"node: {'running' if running else 'not running'}"
             + (f" (PID {pid})" if running and pid and pid > 0 else "")
             + f"; storage {root}; DICOM {settings.dicom.ae_title} on "
             f"{settings.dicom.bind_address}:{settings.dicom.port}"
             + (f"; web on {web.bind_address}:{web.port} (/healthz, /metrics)" if web else "")]
    from .database import database_path

    counts: dict[str, int] = {}
    oldest = None
    if database_path(root).is_file():
        queue = JobQueue(root)
        counts, oldest = queue.counts(), queue.oldest_waiting()
    lines.append("jobs: " + (", ".join(f"{state} {counts[state]}" for state in states.STATES
                                      if counts.get(state)) or "none"))
    if oldest is not None:
        lines.append(f"oldest unfinished job: created {time.time() - oldest:.0f} s ago")
    free = shutil.disk_usage(root).free / 2**20 if root.is_dir() else None
    if free is not None:
        floor = settings.storage.min_free_mib
        lines.append(f"spool free: {free:.0f} MiB" + (
            f" (below storage.min_free_mib {floor}: instances are refused)" if free < floor
            else ""))
    if settings.jobs.backend == "celery":
        lines += _worker_lines(settings)
    if args.json:
        print(json.dumps({"running": running, "pid": pid, "jobs": counts,
                          "oldest_unfinished_job_created_at": oldest,
                          "spool_free_mib": free}, indent=1))
    else:
        print("\n".join(lines))
    return 0 if running else 3


def add_commands(commands: Any) -> None:
    """Add ``serve`` and ``jobs`` to the ``vcemri`` sub-command parser."""
    serve = commands.add_parser(
        "serve", help="run the DICOM node (C-STORE SCP, assembly, jobs, sending to the TPS)",
        description="Receive T1w and T2w series, synthesize a VCE-T1w and send it with the "
        "RTSTRUCT helpers and the review image to the route's destinations. SIGTERM or Ctrl-C "
        "stops accepting, finishes in-flight writes and exits; interrupted jobs resume at the "
        "next start.")
    serve.set_defaults(handler=_serve)

    status = commands.add_parser(
        "status", help="is the node running; its jobs by state, the oldest unfinished one, "
        "free space",
        description="What a running node's /metrics says, from the command line: whether a "
        "node holds the storage folder (exit 0) or not (exit 3), jobs by state, the age of "
        "the oldest unfinished job and the spool's free space.")
    status.add_argument("--json", action="store_true", help="JSON instead of text")
    status.set_defaults(handler=_status)

    worker = commands.add_parser(
        "worker", help="synthesize the node's jobs on this machine (jobs.backend: celery)",
        description="Run a Celery worker that takes the node's synthesis tasks from "
        "jobs.celery.broker_url and runs them here. The machine must mount the node's "
        "storage.root (the shared spool path; README: Scale-out). SIGTERM finishes the "
        "running tasks and exits; a worker killed mid-task leaves its task to another worker "
        "after jobs.celery.visibility_timeout_s.")
    worker.add_argument("--concurrency", type=int, default=1, metavar="N",
                        help="jobs this worker runs at once, one process each (default 1)")
    worker.add_argument("--queues", metavar="CLASSES",
                        help="device classes to take: cpu, gpu or cpu,gpu (default: cpu, plus "
                        "gpu where a CUDA device is present)")
    worker.add_argument("--name", metavar="NAME@HOST",
                        help="the worker's name in logs and `vcemri jobs` (default "
                        "vcemri-<pid>@<hostname>; %%h is the host name)")
    worker.set_defaults(handler=_worker)

    jobs = commands.add_parser("jobs", help="list, show, retry, cancel or purge the node's "
                               "jobs")
    actions = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="jobs, newest first")
    listing.add_argument("--state", action="append", choices=states.STATES,
                         help="only jobs in this state (repeatable)")
    listing.add_argument("--limit", type=int, default=50, help="at most N jobs (default 50)")
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(handler=_jobs_list)
    show = actions.add_parser("show", help="one job: inputs, result, deliveries, history")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true", help="JSON instead of text")
    show.set_defaults(handler=_jobs_show)
    retry = actions.add_parser("retry", help="process a failed, rejected or cancelled job again")
    retry.add_argument("id", type=int)
    retry.add_argument("--force", action="store_true",
                       help="a study screening rejected: process it anyway (audited; the "
                       "verdict in every object says it was refused and forced)")
    retry.set_defaults(handler=_jobs_retry)
    cancel = actions.add_parser("cancel", help="stop a job that has not finished")
    cancel.add_argument("id", type=int)
    cancel.set_defaults(handler=_jobs_cancel)
    purging = actions.add_parser(
        "purge", help="delete the inputs and outputs of jobs finished long ago",
        description="Delete the spooled input instances and the output files of jobs that "
        "finished (done, failed, rejected, cancelled) more than --older-than days ago; "
        "instances another job still needs are kept, job histories and the audit log stay, "
        "and every purge is audited. With --free-mib, finished jobs are purged oldest first "
        "until that much disk space is free. storage.retention_days and "
        "storage.retention_free_mib do the same in the node.")
    which = purging.add_mutually_exclusive_group(required=True)
    which.add_argument("--older-than", metavar="DAYS",
                       help="age of the job's last change, in days (e.g. 30, 0.5)")
    which.add_argument("--free-mib", type=float, metavar="MIB",
                       help="purge finished jobs, oldest first, until this much is free")
    purging.add_argument("--dry-run", action="store_true", help="say what would be deleted")
    purging.set_defaults(handler=_jobs_purge)
