"""Synthesis in a child process, so that a crash inside it never stops reception.

A native crash in a library, CUDA running out of memory, the kernel's out-of-memory killer
or an operator's ``kill -9`` ends the child process; the node's SCP, assembler and web threads
live in the parent and go on. The worker thread that asked for the synthesis reads why the
child ended (:class:`SynthesisCrashed`, e.g. "killed by SIGKILL") and retries the job with
backoff like any other passing error; the next request starts a fresh child.

Each worker has one long-lived child (:class:`SynthesisProcess`), started with the node, that
loads the default model at once and keeps its models between jobs, so a study does not wait
for PyTorch to import and a model to load. Children
are forked from a ``multiprocessing`` fork server that has imported PyTorch and the pipeline
once (a fresh interpreter, never a fork of the node's threads and sockets). A child whose node
died without a word (``kill -9`` of the node) notices that its parent is gone within a second
and exits, so that it cannot go on writing results the restarted node will produce again.

The child's log records travel over its pipe and are handled by the node's loggers, so
``--log-format json`` and the log level apply to them as to the rest.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sqlite3
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import config

from .jobs import RUNNING, JobChanged

if TYPE_CHECKING:
    import planning
    from synthesis import WrittenObject

    from .jobs import JobQueue

log = logging.getLogger(__name__)

#: Imported once by the fork server, so that each child starts in well under a second.
PRELOAD = ["torch", "synthesis", "planning", "dicom_node.synthesis_process"]

#: How often the waiting worker looks whether its child is still alive (seconds).
POLL_S = 0.2

#: How often the waiting worker looks whether its job was cancelled meanwhile (seconds).
CHECK_JOB_S = 1.0

#: How often a child looks whether its node is still alive (seconds).
PARENT_CHECK_S = 1.0


@dataclass(frozen=True)
class Request:
    """One study to synthesize: ``planning.SynthesisService.process``'s arguments."""

    job_id: int
    t1w: list[Path]
    t2w: list[Path] | None
    out: Path
    model: str = "default"
    enforce: bool = True
    supersedes: planning.Supersedes | None = None
    #: further inputs by role (DWI, ...) for a model that reads them
    extra: dict[str, list[Path]] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What the child did with a :class:`Request`.

    ``done``: ``objects``, ``summary`` and ``device`` as in ``planning.ProcessedStudy``;
    ``rejected``: screening refused the study (``reason``; ``notice``, the refusal notice for
    the TPS, when one was written); ``failed``: bad input, an unusable model or configuration
    (``reason``: retrying cannot help); ``error``: anything else (``reason`` and ``details``,
    the child's traceback), which may pass on a retry."""

    kind: Literal["done", "rejected", "failed", "error"]
    reason: str = ""
    objects: list[WrittenObject] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    device: str = ""
    notice: WrittenObject | None = None
    details: str = ""


class SynthesisCrashed(config.VcemriError):
    """The synthesis process ended before it answered (a native crash, a kill, no memory)."""


def _context() -> Any:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _ended(exitcode: int | None) -> str:
    """How a process ended, in words a person can act on."""
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = {"SIGKILL": " (kill -9, or the kernel's out-of-memory killer)",
                "SIGSEGV": " (a native crash)", "SIGABRT": " (a native library aborted)"}
        return f"was killed by {name}{hint.get(name, '')}"
    return f"exited with status {exitcode}"


class SynthesisProcess:
    """A worker's synthesis child; :meth:`run` sends it a study and waits for the outcome."""

    def __init__(self, settings: config.Settings, name: str = "synthesis",
                 queue: JobQueue | None = None) -> None:
        """``queue``: where the waiting worker looks whether the job is still wanted; a job
        cancelled while its study is being synthesized ends the child at once (killed: the
        study's partial outputs are removed, the next job starts a fresh child)."""
        self.settings = settings
        self.name = name
        self.queue = queue
        self._process: Any = None
        self._connection: Connection | None = None
        #: the job the child is working on (None while idle)
        self.job_id: int | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        process = self._process
        return process.pid if process is not None and process.is_alive() else None

    def start(self) -> None:
        """Start the child if none is alive (a request starts one too)."""
        if self._process is not None and self._process.is_alive():
            return
        self._close()
        self._stopping = False
        context = _context()
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_serve, name=self.name, daemon=True,
                                  args=(child_end, self.settings, logging.getLogger().level))
        process.start()
        child_end.close()
        self._process, self._connection = process, parent_end
        log.info("%s: synthesis process %d started", self.name, process.pid)

    def run(self, request: Request) -> Outcome:
        """The child's outcome for ``request``; raises :class:`SynthesisCrashed` when the child
        ends before it answers (it is restarted on the next request)."""
        if request.out.exists():  # what an earlier attempt wrote
            shutil.rmtree(request.out)
        self.start()
        process, connection = self._process, self._connection
        assert process is not None and connection is not None
        self.job_id = request.job_id
        checked = time.monotonic()
        try:
            connection.send(request)
            while True:
                if connection.poll(POLL_S):
                    message = connection.recv()
                    if message[0] == "log":
                        _handle(message[1])
                        continue
                    outcome: Outcome = message[1]
                    return outcome
                if not process.is_alive():
                    break
                if self.queue is not None and time.monotonic() - checked > CHECK_JOB_S:
                    checked = time.monotonic()
                    try:
                        state = self.queue.get(request.job_id).state
                    except sqlite3.Error:  # the database is busy: look again next time
                        continue
                    if state != RUNNING:  # cancelled by an administrator meanwhile
                        pid = process.pid
                        self._end_child()
                        shutil.rmtree(request.out, ignore_errors=True)
                        raise JobChanged(f"job {request.job_id} is {state} now; its synthesis "
                                         f"process (pid {pid}) was ended")
        except (EOFError, OSError):
            pass  # the child went away mid-message
        finally:
            self.job_id = None
        process.join(5.0)
        if self._stopping:
            reason = (f"the node stopped while job {request.job_id} was being synthesized; "
                      "it resumes at the next start")
        else:
            reason = (f"the synthesis process (pid {process.pid}) {_ended(process.exitcode)} "
                      f"while working on job {request.job_id}; reception was not affected")
        self._close()
        raise SynthesisCrashed(reason)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the child to exit after its current study; kill it after ``timeout_s``."""
        process, connection = self._process, self._connection
        if process is None:
            return
        self._stopping = True
        try:
            if connection is not None and self.job_id is None:
                connection.send(None)
        except OSError:
            pass
        process.join(timeout_s)
        self._end_child()

    def _end_child(self) -> None:
        """Kill the child (if it still runs) and forget it; the next request starts another."""
        process = self._process
        if process is not None and process.is_alive():
            process.kill()
            process.join(5.0)
        self._close()

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        if self._process is not None and not self._process.is_alive():
            self._process.close()
        self._process = self._connection = None


def _handle(record: dict[str, Any]) -> None:
    """Handle a child's log record with the node's loggers."""
    entry = logging.makeLogRecord(record)
    logger = logging.getLogger(entry.name)
    if logger.isEnabledFor(entry.levelno):
        logger.handle(entry)


class _PipeHandler(logging.Handler):
    """Sends a child's log records to its node."""

    def __init__(self, connection: Connection, lock: threading.Lock) -> None:
        super().__init__()
        self.connection = connection
        self.sending = lock  # shared with the outcome's send (Handler.lock is logging's own)
        # redact before the message is formatted here: the node's filter sees only text
        self.addFilter(config.PHIFilter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            values = dict(record.__dict__)
            values["msg"], values["args"] = record.getMessage(), None
            values["exc_info"] = None
            if record.exc_info:
                values["exc_text"] = "".join(traceback.format_exception(*record.exc_info))
            with self.sending:
                self.connection.send(("log", values))
        except Exception:  # logging must never take the synthesis down
            self.handleError(record)


def _watch_parent(parent: int) -> None:
    """Exit when the node that started this child is gone (it was killed: no one will read
    the result, and the restarted node runs the job again)."""
    while True:
        threading.Event().wait(PARENT_CHECK_S)
        if os.getppid() != parent:
            os._exit(70)


def _serve(connection: Connection, settings: config.Settings, level: int) -> None:
    """The child: synthesize requests until ``None`` or the node closes the pipe."""
    import planning
    import synthesis

    # The fork server is this child's parent and exits when the node does.
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    lock = threading.Lock()
    root = logging.getLogger()
    root.handlers[:] = [_PipeHandler(connection, lock)]
    root.setLevel(level)
    service = planning.SynthesisService(settings)
    if "default" in settings.models:  # loaded before the first study needs it
        try:
            service.synthesizer("default")
        except Exception:  # the job that needs it reports why
            logging.getLogger(__name__).debug("default model not preloaded", exc_info=True)
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            done = service.process(request.t1w, request.t2w, request.out, model=request.model,
                                   enforce=request.enforce, supersedes=request.supersedes,
                                   extra_files=request.extra)
            outcome = Outcome("done", objects=list(done.objects), summary=done.summary,
                              device=done.device)
        except synthesis.RejectedStudy as rejected:
            outcome = Outcome("rejected", rejected.reason,
                              notice=getattr(rejected, "notice", None))
        except (config.InputError, config.ModelError, config.ConfigError) as exc:
            outcome = Outcome("failed", str(exc))
        except Exception as exc:  # may pass on a retry (e.g. CUDA out of memory)
            outcome = Outcome("error", f"{type(exc).__name__}: {exc}",
                              details=traceback.format_exc())
        with lock:
            connection.send(("outcome", outcome))
