"""``vcemri demo``: the whole product on loopback with the embedded defaults.

Simulates one patient (``simulation``), starts a node (``dicom_node``) and a TPS
stand-in (a pynetdicom storage SCP that writes what it receives), sends the patient's T1w and
T2w series to the node with a C-STORE SCU as a scanner would, waits until the synthetic series,
the RTSTRUCT and the review image have arrived at the TPS, and prints what happened.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import config

DEMO_INSTITUTION = "inst1"
SERIES_IDLE_S = 2.0


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TPSStandIn:
    """A storage SCP writing every instance it receives to ``folder/<Modality>-<UID>.dcm``."""

    def __init__(self, folder: Path, ae_title: str, port: int) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = port
        self.received: list[tuple[float, str, str]] = []  # time, modality, path
        self._lock = threading.Lock()
        self.server: Any = None

    def start(self) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.presentation import StoragePresentationContexts

        ae = AE(ae_title=self.ae_title)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        dataset = event.dataset
        path = self.folder / f"{dataset.Modality}-{dataset.SOPInstanceUID}.dcm"
        with open(path, "wb") as handle:
            handle.write(event.encoded_dataset())
        with self._lock:
            self.received.append((time.time(), str(dataset.Modality), str(path)))
        return 0x0000

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()


#: Worker processes of ``vcemri demo --scale-out``.
WORKERS = 2


class ScaleOut:
    """The demo on Celery: a private Redis and ``WORKERS`` ``vcemri worker`` processes that
    share the node's storage folder (the shared spool path, here on one disk)."""

    def __init__(self, out: Path, config_file: str | None, count: int) -> None:
        from .redis_server import RedisServer

        self.out = out
        self.config_file = config_file
        self.redis = RedisServer(out / "redis")
        self.names = [f"demo-worker-{k + 1}@{socket.gethostname()}" for k in range(count)]
        self.workers: list[subprocess.Popen[bytes]] = []
        self.environment: dict[str, str] = {}

    def start(self, settings: config.Settings) -> config.Settings:
        """Start Redis; the node's settings with the celery backend on it."""
        self.redis.start()
        celery = settings.jobs.celery.model_copy(update={
            "broker_url": self.redis.url, "result_backend": None,
            "in_flight": len(self.names), "visibility_timeout_s": 60.0})
        settings = settings.model_copy(update={"jobs": settings.jobs.model_copy(
            update={"backend": "celery", "celery": celery})})
        self.environment = {
            "VCEMRI_STORAGE__ROOT": str(settings.storage.root),
            "VCEMRI_JOBS__BACKEND": "celery",
            "VCEMRI_JOBS__CELERY__BROKER_URL": self.redis.url,
            "VCEMRI_JOBS__CELERY__VISIBILITY_TIMEOUT_S": "60",
        }
        return settings

    def start_workers(self) -> None:
        """Start the worker processes (the node's storage folder exists by now)."""
        command = [sys.executable, "-m", "vcemri"]
        if self.config_file:
            command += ["--config", str(self.config_file)]
        for name in self.names:
            log = open(self.out / f"{name.split('@')[0]}.log", "ab")
            self.workers.append(subprocess.Popen(
                [*command, "worker", "--name", name], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **self.environment}, start_new_session=True))
            log.close()

    def stop(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.wait(30.0)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(5.0)
        self.redis.stop()


def _demo(args: argparse.Namespace) -> int:
    import pydicom

    import dicom_node
    import simulation

    started = time.perf_counter()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vcemri-demo-"))
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise config.VcemriError(f"output directory {out} is not empty",
                                 hint="choose another or pass --overwrite")
    base = config.load_settings(args.config)
    node_port, tps_port = free_port(), free_port()
    # One route to the stand-in only: a site configuration's real destinations never see
    # the demo's simulated patient.
    destination = config.Destination(ae_title="TPS", host="127.0.0.1", port=tps_port)
    route = config.Route(name="demo", model="default", destinations=["tps"])
    settings = base.model_copy(update={
        "dicom": base.dicom.model_copy(update={"port": node_port, "bind_address": "127.0.0.1",
                                               "allowed_calling_aes": [], "tls": None}),
        "storage": base.storage.model_copy(update={"root": out / "node", "min_free_mib": 64,
                                                   "audit_log": None}),
        "assembly": base.assembly.model_copy(update={"series_idle_s": SERIES_IDLE_S}),
        "destinations": {"tps": destination},
        "routes": [route],
    })
    if "default" not in settings.models:
        raise config.ConfigError("configuration", ["models: the demo uses models.default"])
    print(f"demo folder: {out}")
    scale_out = None
    if args.scale_out:
        scale_out = ScaleOut(out, args.config, WORKERS)
        settings = scale_out.start(settings)
        print(f"    scale-out: Redis on {scale_out.redis.shown_url}, {WORKERS} vcemri worker "
              f"processes (logs in {out})", flush=True)
    print("1/4 simulating one head-and-neck patient (T1w, T2w) ...", flush=True)
    options = simulation.SimulationOptions(institutions=(DEMO_INSTITUTION,),
                                           patients_per_institution=1, seed=args.seed,
                                           matrix_scale=0.75, slices=args.slices)
    record = simulation.simulate_patient(out / "patient", DEMO_INSTITUTION, 1, options)
    simulated = time.perf_counter()
    files = {role: sorted((out / "patient" / record.paths[role]).glob("*.dcm"))
             for role in ("t1w", "t2w")}
    tps = TPSStandIn(out / "tps", destination.ae_title, tps_port)
    tps.start()
    try:
        node = dicom_node.Node(settings)
    except BaseException:
        tps.stop()
        if scale_out is not None:
            scale_out.stop()
        raise
    try:
        if scale_out is not None:
            scale_out.start_workers()
        node.start()
        print(f"2/4 node {settings.dicom.ae_title} on 127.0.0.1:{node_port}, TPS stand-in "
              f"{destination.ae_title} on 127.0.0.1:{tps_port}", flush=True)
        scanner = config.Destination(ae_title=settings.dicom.ae_title, host="127.0.0.1",
                                     port=node_port)
        instances = []
        for t1, t2 in zip(files["t1w"], files["t2w"]):  # interleaved, as a router may send
            for path in (t1, t2):
                instances.append(dicom_node.Output(str(pydicom.dcmread(
                    path, stop_before_pixels=True).SOPInstanceUID), path))
        sent = dicom_node.send(instances, scanner, "node", calling_ae="DEMO_MR",
                               timeouts=settings.dicom.timeouts)
        sent_at = time.perf_counter()
        print(f"3/4 sent {sent} instances (T1w and T2w, {len(files['t1w'])} slices each) with a "
              f"C-STORE SCU in {sent_at - simulated:.1f} s; waiting for the node ...", flush=True)
        job = _wait_for_job(node, args.timeout)
        finished = time.perf_counter()
        expected = len(node.queue.outputs(job.id))
        while len(tps.received) < expected and time.perf_counter() - finished < 10:
            time.sleep(0.1)
    finally:
        node.stop()
        tps.stop()
        if scale_out is not None:
            scale_out.stop()
    if job.state != "done":
        raise config.VcemriError(f"the demo's job ended {job.state}: {job.reason}")
    result = job.result
    modalities: dict[str, int] = {}
    for _, modality, _ in tps.received:
        modalities[modality] = modalities.get(modality, 0) + 1
    decision = result["institution"]
    where = (f"known institution {decision['institution']}" if decision["known"] else
             f"external (closest {decision['closest']})")
    timings = result.get("timings_s", {})
    print("4/4 done")
    print(f"  time:               {time.perf_counter() - started:.0f} s in all; simulation "
          f"{simulated - started:.1f} s, sending {sent_at - simulated:.1f} s, assembly + "
          f"synthesis + delivery {finished - sent_at:.1f} s (series idle time "
          f"{SERIES_IDLE_S:.0f} s; synthesis {timings.get('total', 0):.1f} s on "
          f"{result.get('device')})")
    print(f"  institution:        {where}, confidence {decision['confidence']:.2f}")
    print(f"  EDM:                {result['edm']['line']}")
    if scale_out is not None:
        print(f"  synthesized by:     Celery worker {result.get('worker')} (of "
              f"{', '.join(scale_out.names)})")
    print("  arrived at the TPS: " + ", ".join(f"{n} {m}" for m, n in sorted(modalities.items()))
          + f" in {tps.folder}")
    print(f"  review image:       {result['outputs']['review_png']}")
    print(f"  job:                {job.id} ({job.state}); audit log "
          f"{settings.storage.audit_log_path}")
    return 0


def _wait_for_job(node: Any, timeout_s: float) -> Any:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        jobs = node.queue.list()
        ended = [j for j in jobs if j.state in ("done", "failed", "rejected", "cancelled")]
        if ended:
            return ended[0]
        time.sleep(0.2)
    states = ", ".join(f"job {j.id} {j.state} ({j.reason})" for j in node.queue.list()) or "none"
    raise config.VcemriError(f"the demo's study was not processed within {timeout_s:.0f} s "
                             f"(jobs: {states})")


def add_commands(commands: Any) -> None:
    """Add ``demo`` to the ``vcemri`` sub-command parser."""
    parser = commands.add_parser(
        "demo", help="run the whole product on loopback: simulated scanner, node, TPS stand-in",
        description="Simulate one patient, start a node and a TPS stand-in on loopback, send "
        "the T1w and T2w series with a C-STORE SCU, wait for the synthetic series, RTSTRUCT and "
        "review image to arrive at the TPS, and print a summary. Uses the configuration's "
        "model (default: the shipped weights), series rules and planning settings; its routes "
        "and destinations are replaced by one route to the stand-in, so nothing simulated "
        "reaches a real system.")
    parser.add_argument("--out", metavar="DIR", help="where to keep everything (default: a new "
                        "temporary folder)")
    parser.add_argument("--seed", type=int, default=7, help="simulated patient's seed")
    parser.add_argument("--slices", type=int, default=24, help="slices per series (default 24)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="give up after this many seconds (default 300)")
    parser.add_argument("--overwrite", action="store_true",
                        help="use a non-empty --out folder")
    parser.add_argument("--scale-out", action="store_true",
                        help=f"run the jobs on Celery: a private redis-server and {WORKERS} "
                        "`vcemri worker` processes (needs redis-server; README: Scale-out)")
    parser.set_defaults(handler=_demo)
