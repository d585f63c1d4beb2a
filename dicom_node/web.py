"""The web service of a running node (``web`` section): dashboard, JSON API, health, metrics.

Starlette with Jinja templates, served by uvicorn in a thread of the node's process, reading
the same database as ``vcemri jobs``. Pages: ``/`` (jobs, newest first, with state, reason,
route, model, institution decision, verdict and timings; refreshed every 10 s), ``/jobs/N``
(inputs, history, deliveries per destination, the review image, retry / force / cancel),
``/audit`` (the newest audit records and the hash chain's verification). ``/api/jobs``,
``/api/jobs/N``, ``/api/audit`` and ``/api/status`` give the same as JSON; ``/healthz`` answers
200 or 503 with the reasons; ``/metrics`` is Prometheus' text format.

Access: on loopback without ``web.tokens`` everyone on the machine is user ``local``. With
tokens, every page and API call needs one (``Authorization: Bearer TOKEN``, or the sign-in
form, which sets an HttpOnly SameSite=Strict cookie); the token's user name is what the audit
log records for actions. ``/healthz`` and ``/metrics`` (counts, no patient data) stay open
for load balancers and Prometheus. An action posted from a page of another origin (a web
site the user visits, forging a request to the loopback dashboard) is refused with 403.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import logging
import threading
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import config

from . import actions, health
from . import jobs as states
from .jobs import Job, output_folder
from .metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from .node import Node

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
COOKIE = "vcemri_token"
#: Pages and API calls anyone may read (no patient data, needed by monitors).
OPEN_PATHS = ("/healthz", "/metrics", "/login")
AUDIT_SHOWN = 200


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return _dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def job_record(node: Node, job: Job, *, detail: bool = False) -> dict[str, Any]:
    """A job as the dashboard and the API show it (UIDs, no patient identity)."""
    result = job.result
    decision = result.get("institution") or {}
    record: dict[str, Any] = {
        "id": job.id, "state": job.state, "reason": job.reason, "study_uid": job.study_uid,
        "t1w_series_uid": job.t1w_series_uid, "t2w_series_uid": job.t2w_series_uid,
        "route": job.route, "model": job.model, "destinations": job.destinations,
        "attempts": job.attempts, "forced": job.forced,
        "created_at": job.created_at, "updated_at": job.updated_at,
        "institution": (decision.get("institution") or
                        (f"external (closest {decision['closest']})"
                         if decision.get("closest") else None)),
        "edm": (result.get("edm") or {}).get("line"),
        "verdict": (result.get("verdict") or {}).get("line"),
        "processing_s": result.get("processing_s"),
        "review": (output_folder(node.root, job.id) / "review.png").is_file(),
    }
    if detail:
        outputs = node.queue.outputs(job.id)
        record["inputs"] = {role: len(pairs) for role, pairs in job.inputs.items()}
        record["screening"] = result.get("screening")
        record["supersedes"] = (result.get("outputs") or {}).get("supersedes")
        record["outputs"] = len(outputs)
        record["deliveries"] = {name: len(node.queue.delivered(job.id, name))
                                for name in job.destinations}
        asked = {name: node.commitments.latest(job.id, name) for name in job.destinations}
        record["commitments"] = {name: c.describe() for name, c in asked.items() if c}
        record["transitions"] = node.queue.transitions(job.id)
    return record


def status(node: Node) -> dict[str, Any]:
    """The node summary ``/api/status`` and the dashboard's header show."""
    verdict = health.check(node)
    oldest = node.queue.oldest_waiting()
    found = node.celery_workers
    return {"ae_title": node.settings.dicom.ae_title, "dicom_port": node.scp.port,
            "health": verdict.as_dict(), "jobs": node.queue.counts(),
            "workers": None if node.settings.jobs.backend != "celery" else (
                "not asked yet" if found is None else found if isinstance(found, str)
                else [w.line() for w in found] or "none answered: start `vcemri worker`"),
            "spool_free_mib": round(node.spool.free_mib(), 1),
            "oldest_unfinished_job_age_s": None if oldest is None else round(
                max(0.0, _dt.datetime.now().timestamp() - oldest), 1)}


def _audit_tail(path: Path, count: int = AUDIT_SHOWN) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return list(reversed(deque(config.read_audit(path), maxlen=count)))


def create_app(node: Node) -> Starlette:
    """The Starlette application for ``node``."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import (
        FileResponse,
        JSONResponse,
        PlainTextResponse,
        RedirectResponse,
    )
    from starlette.routing import Route
    from starlette.templating import Jinja2Templates

    web = node.settings.web
    assert web is not None
    digests = {name: digest for name, digest in web.tokens.items()}
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["when"] = _when
    audit_path = Path(node.settings.storage.audit_log_path)

    def user_of(token: str | None) -> str | None:
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).hexdigest()
        for name, expected in digests.items():
            if hmac.compare_digest(digest, expected):
                return name
        return None

    class Authentication(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: Any) -> Response:
            if not digests:
                request.state.user = "local"
                return await call_next(request)
            if request.url.path in OPEN_PATHS:
                request.state.user = None
                return await call_next(request)
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(
                COOKIE)
            user = user_of(token)
            if user is None:
                if request.url.path.startswith("/api/"):
                    return JSONResponse({"error": "a valid token is required (Authorization: "
                                                  "Bearer TOKEN)"}, status_code=401)
                return RedirectResponse("/login", status_code=303)
            request.state.user = user
            return await call_next(request)

    def job_or_404(job_id: int) -> Job:
        try:
            return node.queue.get(job_id)
        except config.InputError:
            raise HTTPException(404, f"there is no job {job_id}") from None

    async def index(request: Request) -> Response:
        jobs = [job_record(node, j) for j in node.queue.list(limit=100)]
        return templates.TemplateResponse(request, "jobs.html", {
            "jobs": jobs, "status": status(node), "user": request.state.user})

    async def job_page(request: Request) -> Response:
        job = job_or_404(int(request.path_params["job_id"]))
        return templates.TemplateResponse(request, "job.html", {
            "job": job_record(node, job, detail=True), "status": status(node),
            "user": request.state.user, "message": request.query_params.get("message"),
            "can_retry": job.state in (states.FAILED, states.REJECTED, states.CANCELLED),
            "can_force": job.state == states.REJECTED,
            "can_cancel": job.state in states.ACTIVE})

    async def review(request: Request) -> Response:
        job = job_or_404(int(request.path_params["job_id"]))
        path = output_folder(node.root, job.id) / "review.png"
        if not path.is_file():
            raise HTTPException(404, f"job {job.id} has no review image")
        return FileResponse(path, media_type="image/png")

    async def act(request: Request) -> Response:
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.url.netloc:
            # a page of another site posting to the dashboard (cross-site request forgery)
            return JSONResponse({"error": f"actions are refused from pages of {origin}"},
                                status_code=403)
        job_id = int(request.path_params["job_id"])
        job_or_404(job_id)
        action = request.path_params["action"]
        form = await request.form()
        user = f"web:{request.state.user}"
        try:
            if action == "cancel":
                job = actions.cancel(node.queue, job_id, user)
            elif action == "retry":
                job = actions.retry(node.queue, job_id, user, force=form.get("force") == "1")
            else:
                raise HTTPException(404, f"no action {action!r}")
            message = f"job {job.id} is {job.state}"
        except config.InputError as exc:
            message = exc.reason
        log.info("job %d: %s from the dashboard by %s: %s", job_id, action, user, message)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"message": message, "job": job_record(
                node, node.queue.get(job_id))})
        return RedirectResponse(f"/jobs/{job_id}?message={quote(message)}", status_code=303)

    async def audit_page(request: Request) -> Response:
        chain = config.verify_audit(audit_path) if audit_path.is_file() else None
        return templates.TemplateResponse(request, "audit.html", {
            "records": _audit_tail(audit_path), "chain": chain, "status": status(node),
            "user": request.state.user})

    async def login(request: Request) -> Response:
        if request.method == "POST":
            form = await request.form()
            token = str(form.get("token") or "")
            if user_of(token) is not None:
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                                    secure=web.tls is not None)
                return response
            return templates.TemplateResponse(request, "login.html",
                                              {"error": "unknown token"}, status_code=401)
        return templates.TemplateResponse(request, "login.html", {"error": None})

    async def api_jobs(request: Request) -> Response:
        limit = int(request.query_params.get("limit", 100))
        return JSONResponse([job_record(node, j) for j in node.queue.list(limit=limit)])

    async def api_job(request: Request) -> Response:
        job = job_or_404(int(request.path_params["job_id"]))
        return JSONResponse(job_record(node, job, detail=True))

    async def api_audit(request: Request) -> Response:
        chain = config.verify_audit(audit_path) if audit_path.is_file() else None
        return JSONResponse({"records": _audit_tail(audit_path),
                             "chain": None if chain is None else {
                                 "ok": chain.ok, "records": chain.records,
                                 "broken_line": chain.broken_line, "problem": chain.problem}})

    async def api_status(request: Request) -> Response:
        return JSONResponse(status(node))

    async def healthz(request: Request) -> Response:
        verdict = health.check(node)
        return JSONResponse(verdict.as_dict(), status_code=200 if verdict.ok else 503)

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(node.metrics.exposition(), media_type=CONTENT_TYPE)

    routes = [
        Route("/", index), Route("/jobs/{job_id:int}", job_page),
        Route("/jobs/{job_id:int}/review.png", review),
        Route("/jobs/{job_id:int}/{action}", act, methods=["POST"]),
        Route("/audit", audit_page), Route("/login", login, methods=["GET", "POST"]),
        Route("/api/jobs", api_jobs), Route("/api/jobs/{job_id:int}", api_job),
        Route("/api/jobs/{job_id:int}/{action}", act, methods=["POST"]),
        Route("/api/audit", api_audit), Route("/api/status", api_status),
        Route("/healthz", healthz), Route("/metrics", metrics),
    ]
    return Starlette(routes=routes, middleware=[Middleware(Authentication)])


class WebServer:
    """uvicorn serving :func:`create_app` in a thread; :meth:`start` returns once it
    listens."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.server: Any = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        import uvicorn

        web = self.node.settings.web
        assert web is not None
        options: dict[str, Any] = {}
        if web.tls is not None:
            options = {"ssl_certfile": str(web.tls.certificate),
                       "ssl_keyfile": str(web.tls.private_key)}
        self.server = uvicorn.Server(uvicorn.Config(
            create_app(self.node), host=web.bind_address, port=web.port, log_config=None,
            access_log=False, lifespan="off", **options))
        self.thread = threading.Thread(target=self.server.run, name="web", daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started or not self.thread.is_alive():
                break
            threading.Event().wait(0.05)
        if not self.server.started:
            raise config.VcemriError(
                f"the web service cannot listen on {web.bind_address}:{web.port}",
                hint="another program may use the port; change web.port")
        log.info("web dashboard on %s://%s:%d/%s", "https" if web.tls else "http",
                 web.bind_address, web.port, "" if web.tokens else " (loopback, no sign-in)")

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10.0)
