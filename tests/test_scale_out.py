"""``jobs.backend: celery`` with real components: a real ``redis-server`` on a free loopback
port, a node in this process, two ``vcemri worker`` processes sharing its storage folder, and
dcmtk's storescp as the TPS.

One cluster serves the module's scenarios in turn (each with its own patient): a study end to
end with a worker killed (kill -9 of its whole process group) mid-job, Redis killed and
restarted mid-run, a job routed to a GPU model that CPU workers never take, and the workers'
health in ``vcemri jobs``. The shipped model synthesizes (a study takes seconds on a worker,
long enough to be caught running)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
import redis
from support.dcmtk import StoreSCP, storescu
from support.node import query, start_node, wait_for, write_config
from support.processes import ManagedProcess, free_port
from support.tools import require

import config
from simulation import SimulationOptions, simulate_patient
from vcemri.redis_server import RedisServer

#: A killed worker's task goes to the other worker this long after it was taken (seconds);
#: longer than a synthesis here (about 10 s on 2 busy cores), or a slow run is run twice.
VISIBILITY_S = 25.0


def _patient(root: Path, number: int) -> list[Path]:
    options = SimulationOptions(institutions=("inst1",), patients_per_institution=1, seed=7,
                                matrix_scale=0.75, slices=12)
    record = simulate_patient(root, "inst1", number, options)
    t1w, t2w = (sorted((root / record.paths[r]).glob("*.dcm")) for r in ("t1w", "t2w"))
    return [f for pair in zip(t1w, t2w) for f in pair]


class Cluster:
    """Redis, the node (in this process), the TPS and named worker processes."""

    def __init__(self, tmp: Path) -> None:
        require("redis-server")
        self.tmp = tmp
        self.redis = RedisServer(tmp / "redis").start()
        self.tps = StoreSCP(tmp / "tps")
        self.root = tmp / "root"
        self.config = write_config(
            tmp / "node.yaml", self.root, Path("unused"),
            destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1",
                                  "port": self.tps.port}},
            jobs={"backend": "celery",
                  "celery": {"broker_url": self.redis.url, "in_flight": 2,
                             "visibility_timeout_s": VISIBILITY_S}},
            assembly={"series_idle_s": 1.0, "study_timeout_s": 120.0},
            web={"port": free_port()},
            models={"default": {"checkpoint": "builtin", "device": "cpu"},
                    "on-gpu": {"checkpoint": "builtin", "device": "cuda"}},
            routes=[{"name": "gpu", "match": {"calling_ae": "^GPU_MR$"}, "model": "on-gpu",
                     "destinations": ["tps"]},
                    {"name": "default", "model": "default", "destinations": ["tps"]}])
        self.settings = config.load_settings(self.config)
        self.node = start_node(self.config)
        self.workers: dict[str, ManagedProcess] = {}
        for name in ("alpha", "beta"):
            self.start_worker(name)

    def start_worker(self, name: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VCEMRI_")}
        env["OMP_NUM_THREADS"] = "1"
        self.workers[name] = ManagedProcess(
            [sys.executable, "-m", "vcemri", "--config", str(self.config), "worker",
             "--name", f"{name}@test", "--queues", "cpu"], self.tmp / f"worker-{name}.log", env=env)

    def kill_worker(self, name: str) -> None:
        """kill -9 of the worker and its pool processes, as a machine that went down."""
        os.killpg(self.workers[name].process.pid, signal.SIGKILL)
        self.workers[name].process.wait(10)

    def job(self, job_id: int) -> dict:
        return dict(query(self.root, "SELECT * FROM jobs WHERE id = ?", job_id)[0])

    def job_of(self, study_uid: str) -> dict | None:
        rows = query(self.root, "SELECT * FROM jobs WHERE study_uid = ?", study_uid)
        return dict(rows[0]) if rows else None

    def history(self, job_id: int) -> list[str]:
        return [f"{r['state']}: {r['reason']}" for r in query(
            self.root, "SELECT * FROM transitions WHERE job_id = ? ORDER BY rowid", job_id)]

    def stop(self) -> None:
        self.node.stop()
        for worker in self.workers.values():
            worker.stop()
        self.tps.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    running = Cluster(tmp_path_factory.mktemp("scale-out"))
    try:
        yield running
    finally:
        running.stop()


def _send(cluster: Cluster, number: int, calling_ae: str = "MR_SCANNER") -> SimpleNamespace:
    files = _patient(cluster.tmp / "patients", number)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(files, cluster.node.scp.port, called_ae="VCEMRI",
                    calling_ae=calling_ae).ok
    job = wait_for(lambda: cluster.job_of(study), 60, "the study's job")
    return SimpleNamespace(study=study, job=job["id"], files=files)


def _running_on(cluster: Cluster, job_id: int) -> str:
    """The worker the node says runs the job (``running on worker alpha@test (pid N)``)."""
    reason = wait_for(lambda: re.search(r"running on worker (\w+)@test",
                                        cluster.job(job_id)["reason"] or ""),
                      120, f"job {job_id} running on a worker", interval=0.1)
    return reason.group(1)


def _synthetic_at_tps(cluster: Cluster, study: str) -> Counter:
    """Receipts at the TPS of the study's synthetic series, by Series Instance UID."""
    series: Counter = Counter()
    for path in cluster.tps.received():
        header = pydicom.dcmread(path, stop_before_pixels=True)
        if header.StudyInstanceUID == study and header.Modality == "MR":
            series[str(header.SeriesInstanceUID)] += 1
    return series


def _delivered_once(cluster: Cluster, sent: SimpleNamespace) -> dict:
    job = wait_for(lambda: (j := cluster.job(sent.job))["state"] in ("done", "failed") and j,
                   180, f"job {sent.job} done", interval=0.2)
    assert job["state"] == "done", cluster.history(sent.job)
    outputs = [r["sop_instance_uid"] for r in query(
        cluster.root, "SELECT sop_instance_uid FROM outputs WHERE job_id = ?", sent.job)]
    synthetic = wait_for(lambda: sum((s := _synthetic_at_tps(cluster, sent.study)).values())
                         >= 12 and s, 30, "the synthetic series at the TPS")
    assert len(synthetic) == 1 and list(synthetic.values()) == [12], synthetic
    duplicated = {uid: n for uid, n in Counter(
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        for p in cluster.tps.received()).items() if n > 1}
    assert not duplicated, duplicated
    assert set(outputs) <= {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                            for p in cluster.tps.received()}
    return job


def test_worker_killed_mid_job_the_other_worker_completes_it_once(cluster):
    """A study end to end on the workers; the worker running it is killed with SIGKILL (its
    pool process included): the task was not acknowledged, so after the visibility timeout
    the other worker runs it, and the TPS receives one synthetic series, each instance once.
    The job's history names both workers; its result names the one that finished."""
    sent = _send(cluster, 1)
    first = _running_on(cluster, sent.job)
    cluster.kill_worker(first)
    other = "beta" if first == "alpha" else "alpha"
    job = _delivered_once(cluster, sent)
    assert json.loads(job["result"])["worker"] == f"{other}@test"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VCEMRI_")}
    shown = subprocess.run([sys.executable, "-m", "vcemri", "--config", str(cluster.config),
                            "jobs", "show", str(sent.job)], capture_output=True, text=True,
                           env=env, timeout=60).stdout
    assert f"synthesized:  by Celery worker {other}@test on cpu" in shown, shown
    assert re.search(rf"running +running on worker {first}@test", shown), shown
    history = cluster.history(sent.job)
    assert f"running: running on worker {first}@test" in "\n".join(history)
    assert f"running: running on worker {other}@test" in "\n".join(history)
    assert sum(h.startswith("sending:") for h in history) == 1, history
    audit = [r for r in config.read_audit(cluster.root / "audit.jsonl")
             if r.get("event") == "job.synthesized" and r.get("job_id") == sent.job]
    assert [r["worker"] for r in audit] == [f"{other}@test"]
    assert not list((cluster.root / "outputs" / ".staging").glob("*"))
    cluster.start_worker(first)


def test_a_pool_process_crash_fails_that_run_and_the_job_is_retried(cluster):
    """The pool process synthesizing the job dies (SIGKILL, as a native crash or the
    out-of-memory killer would end it) while its worker lives: that run fails with the reason
    in the job's history, the node retries the job as a new task, and the TPS receives one
    synthetic series, each instance once."""
    sent = _send(cluster, 5)
    _running_on(cluster, sent.job)
    pid = int(re.search(r"\(pid (\d+)\)", cluster.job(sent.job)["reason"]).group(1))
    os.kill(pid, signal.SIGKILL)
    job = _delivered_once(cluster, sent)
    history = "\n".join(cluster.history(sent.job))
    assert "WorkerLostError" in history and "retrying in" in history, history
    assert job["attempts"] == 2


def test_redis_killed_and_restarted_mid_run_loses_nothing(cluster):
    """Redis is killed (SIGKILL) while a worker synthesizes and comes back 2 s later with its
    append-only file: the worker and the node reconnect, the job completes and the TPS
    receives one synthetic series, each instance once."""
    sent = _send(cluster, 2)
    _running_on(cluster, sent.job)
    cluster.redis.restart(kill=True, down_s=2.0)
    _delivered_once(cluster, sent)


def test_a_node_restarted_mid_job_follows_the_task_instead_of_running_it_again(cluster):
    """The node stops while a worker synthesizes its job (the worker goes on) and starts
    again: the job, left running, is not dispatched a second time; the new node follows the
    task it had sent (its id kept in the job) and delivers its result once."""
    sent = _send(cluster, 4)
    worker = _running_on(cluster, sent.job)
    task = json.loads(cluster.job(sent.job)["result"])["celery_task"]
    cluster.node.stop()
    assert cluster.job(sent.job)["state"] == "running"
    cluster.node = start_node(cluster.config)
    _delivered_once(cluster, sent)
    history = "\n".join(cluster.history(sent.job))
    assert f"following task {task}, dispatched before the node restarted" in history
    received = [line for name in cluster.workers
                for line in (cluster.tmp / f"worker-{name}.log").read_text().splitlines()
                if f"vcemri.synthesize[vcemri-job-{sent.job}-" in line and "received" in line]
    assert len(received) == 1 and task in received[0], received
    assert json.loads(cluster.job(sent.job)["result"])["worker"] == f"{worker}@test"


def test_gpu_model_never_taken_by_cpu_workers_and_its_task_survives_redis(cluster):
    """A study routed to a model on CUDA goes to the gpu queue; the CPU-only workers consume
    only the cpu queue, so it waits there (the job's reason says no worker for it is up) and
    survives Redis being killed and restarted. Cancelling the job revokes the task."""
    sent = _send(cluster, 3, calling_ae="GPU_MR")
    prefix = cluster.settings.jobs.celery.queue_prefix
    reason = wait_for(lambda: "no worker consuming it is up" in (
        cluster.job(sent.job)["reason"] or "") and cluster.job(sent.job)["reason"], 60,
        "the job's reason to say no GPU worker is up", interval=0.2)
    assert f"queued on {prefix}.gpu" in reason and "GPU" in reason
    broker = redis.Redis.from_url(cluster.redis.url)
    assert broker.llen(f"{prefix}.gpu") == 1
    cluster.redis.restart(kill=True, down_s=0.5)
    broker = redis.Redis.from_url(cluster.redis.url)
    assert broker.llen(f"{prefix}.gpu") == 1
    assert cluster.job(sent.job)["state"] == "running"
    cluster.node.queue.cancel(sent.job)
    wait_for(lambda: not cluster.node.workers[0].process.job_id == sent.job
             and not cluster.node.workers[1].process.job_id == sent.job, 30,
             "the node to stop following the cancelled job")
    assert not _synthetic_at_tps(cluster, sent.study)


def test_jobs_lists_the_workers_and_a_worker_without_gpu_refuses_the_gpu_queue(cluster):
    """``vcemri jobs list`` says which workers are up, what they consume and what they run;
    a worker asked to take the gpu queue on a machine without CUDA refuses with the reason."""
    import torch

    env = {k: v for k, v in os.environ.items() if not k.startswith("VCEMRI_")}
    prefix = cluster.settings.jobs.celery.queue_prefix
    listing = wait_for(lambda: (out := subprocess.run(
        [sys.executable, "-m", "vcemri", "--config", str(cluster.config), "jobs", "list"],
        capture_output=True, text=True, env=env, timeout=60).stdout).count(": up,") == 2
        and out, 60, "both workers listed")
    assert f"alpha@test: up, queues {prefix}.cpu" in listing
    assert f"beta@test: up, queues {prefix}.cpu" in listing
    url = f"http://127.0.0.1:{cluster.settings.web.port}/api/status"
    shown = wait_for(lambda: isinstance(w := json.load(urllib.request.urlopen(
        url, timeout=10))["workers"], list) and len(w) == 2 and w, 40,
        "the dashboard's status to list both workers", interval=1.0)
    assert any(line.startswith("alpha@test: up") for line in shown), shown
    if torch.cuda.is_available():
        return  # this machine may take the gpu queue; the rest was checked
    refused = subprocess.run(
        [sys.executable, "-m", "vcemri", "--config", str(cluster.config), "worker",
         "--queues", "gpu"], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode != 0
    assert "no CUDA device" in refused.stderr and "Traceback" not in refused.stderr
