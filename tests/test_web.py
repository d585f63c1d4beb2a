"""The node's web service against a running node: /healthz, Prometheus /metrics, the jobs
dashboard with a job's review image, the JSON API, actions audited with the user, token
access off loopback, and a real browser (headless Chromium) rendering the dashboard."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from support.dcmtk import StoreSCP, storescu
from support.models import make_checkpoint
from support.node import finished_jobs, start_node, wait_for, write_config
from support.processes import free_port

import config
from simulation import SimulationOptions, simulate_cohort

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("web-cohort")
    simulate_cohort(out, SimulationOptions(
        institutions=("inst2",), patients_per_institution=1, matrix_scale=0.25, slices=8),
        workers=1)
    make_checkpoint(out / "model.safetensors", out, ("inst2",))
    return out


def _series(cohort: Path) -> list[Path]:
    folder = cohort / "inst2" / "inst2-001"
    return sorted((folder / "t1w").glob("*.dcm")) + sorted((folder / "t2w").glob("*.dcm"))


def _vcemri(cfg: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vcemri", "--config", str(cfg), *argv],
                          capture_output=True, text=True, timeout=60, check=False)


def _metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + " ") or line.startswith(name + "{")]
    assert values, f"{name} missing from /metrics"
    return sum(values)


@pytest.fixture(scope="module")
def served(cohort, tmp_path_factory):
    """A running node with a web section whose one job (the cohort's study, sent by
    storescu) was processed and delivered to storescp."""
    tmp_path = tmp_path_factory.mktemp("web-node")
    root = tmp_path / "root"
    port = free_port()
    with StoreSCP(tmp_path / "tps") as tps:
        cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors",
                           destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1",
                                                 "port": tps.port}},
                           web={"port": port})
        node = start_node(cfg)
        try:
            base = f"http://127.0.0.1:{port}"
            healthy = httpx.get(f"{base}/healthz")
            assert storescu(_series(cohort), node.scp.port, called_ae="VCEMRI").ok
            [job] = wait_for(lambda: finished_jobs(root), 90, "the job")
            assert job["state"] == "done", job["reason"]
            yield SimpleNamespace(node=node, base=base, job=job["id"], healthy=healthy,
                                  root=root, cfg=cfg)
        finally:
            node.stop()


def test_dashboard_api_health_and_metrics_of_a_running_node(served, cohort, tmp_path):
    base, job = served.base, served.job
    assert served.healthy.status_code == 200
    assert served.healthy.json() == {"status": "ok", "problems": []}
    metrics = httpx.get(f"{base}/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert _metric(text, "vcemri_instances_received_total") == 16
    assert _metric(text, "vcemri_received_bytes_total") > 16 * 8 * 8 * 2
    assert 'vcemri_jobs{state="done"} 1.0' in text
    assert _metric(text, "vcemri_synthesis_seconds_count") == 1
    detail = httpx.get(f"{base}/api/jobs/{job}").json()
    assert [t["state"] for t in detail["transitions"]][-1] == "done"
    assert detail["deliveries"] == {"tps": detail["outputs"]} and detail["outputs"] > 8
    assert f'vcemri_deliveries_total{{destination="tps"}} {detail["outputs"]}.0' in text
    assert _metric(text, "vcemri_spool_free_bytes") > 0
    assert 'vcemri_associations_total{outcome="accepted"}' in text
    # the dashboard: the job's row, its page with the review image
    page = httpx.get(f"{base}/")
    assert page.status_code == 200 and f'id="job-{job}"' in page.text
    assert "done" in page.text and "user local" in page.text
    one = httpx.get(f"{base}/jobs/{job}")
    assert f'src="/jobs/{job}/review.png"' in one.text
    image = httpx.get(f"{base}/jobs/{job}/review.png")
    assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert httpx.get(f"{base}/jobs/999").status_code == 404
    # an action the job's state forbids is refused with the reason
    forged = httpx.post(f"{base}/jobs/{job}/cancel", headers={"Origin": "http://evil.example"})
    assert forged.status_code == 403  # another site's page cannot act on the dashboard
    answer = httpx.post(f"{base}/api/jobs/{job}/retry")
    assert "only failed, rejected or cancelled jobs can be retried" in answer.json()["message"]
    audit = httpx.get(f"{base}/api/audit").json()
    assert audit["chain"]["ok"] and audit["chain"]["records"] >= 10
    assert httpx.get(f"{base}/audit").text.count("hash chain verified") == 1
    # vcemri status says the same from the command line
    status = _vcemri(served.cfg, "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"node: running (PID {os.getpid()}); storage ")
    assert "jobs: done 1" in status.stdout and "spool free: " in status.stdout
    # below storage.min_free_mib, /healthz says so (every instance would be refused)
    port = free_port()
    cfg = write_config(tmp_path / "full.yaml", tmp_path / "root", cohort / "model.safetensors",
                       storage={"root": str(tmp_path / "root"), "min_free_mib": 10**9},
                       web={"port": port})
    full = start_node(cfg)
    try:
        sick = httpx.get(f"http://127.0.0.1:{port}/healthz")
        assert sick.status_code == 503
        assert "instances are refused below storage.min_free_mib" in sick.json()["problems"][0]
    finally:
        full.stop()


def test_off_loopback_needs_tokens_and_actions_are_audited_with_the_user(cohort, tmp_path):
    root = tmp_path / "root"
    port = free_port()
    with pytest.raises(config.ConfigError, match="not loopback: set web.tokens"):
        config.load_settings(write_config(tmp_path / "open.yaml", root,
                                          cohort / "model.safetensors",
                                          web={"bind_address": "0.0.0.0", "port": port}))
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors",
                       web={"bind_address": "0.0.0.0", "port": port,
                            "tokens": {"alice": digest}})
    node = start_node(cfg)
    base = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(f"{base}/healthz").status_code == 200  # open for monitors
        assert httpx.get(f"{base}/metrics").status_code == 200
        assert httpx.get(f"{base}/api/jobs").status_code == 401
        assert httpx.get(f"{base}/", follow_redirects=False).headers["location"] == "/login"
        wrong = {"Authorization": "Bearer not-the-token"}
        assert httpx.get(f"{base}/api/jobs", headers=wrong).status_code == 401
        signed = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{base}/api/jobs", headers=signed).json() == []
        job = node.queue.enqueue("1.2.3.4", reason="T2w series not received")
        cancelled = httpx.post(f"{base}/api/jobs/{job.id}/cancel", headers=signed).json()
        assert cancelled["job"]["state"] == "cancelled"
        with httpx.Client(base_url=base, follow_redirects=True) as browser:  # sign-in cookie
            assert browser.post("/login", data={"token": "nope"}).status_code == 401
            signed_in = browser.post("/login", data={"token": TOKEN})
            assert signed_in.status_code == 200 and "user alice" in signed_in.text
    finally:
        node.stop()
    stopped = _vcemri(cfg, "status")
    assert stopped.returncode == 3 and stopped.stdout.startswith("node: not running")
    assert "jobs: cancelled 1" in stopped.stdout
    records = list(config.read_audit(root / "audit.jsonl"))
    [change] = [r for r in records if r["event"] == "job.cancelled"
                or (r["event"].startswith("job.") and r.get("reason") == "cancelled by web:alice")]
    assert change["reason"] == "cancelled by web:alice"


def test_a_browser_shows_the_jobs_row_and_the_review_image(served, tmp_path):
    """Headless Chromium loads the jobs view (the job's row) and the job's page, whose review
    image the browser fetched and decoded (the page records its natural width on load)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed")
        pytest.skip("chromium is not installed")
    headless = [browser, "--headless", "--no-sandbox", "--disable-gpu",
                "--virtual-time-budget=5000"]
    jobs = subprocess.run([*headless, "--dump-dom", f"{served.base}/"],
                          capture_output=True, text=True, timeout=120)
    assert f'id="job-{served.job}"' in jobs.stdout and ">done<" in jobs.stdout
    page = subprocess.run([*headless, "--dump-dom", f"{served.base}/jobs/{served.job}"],
                          capture_output=True, text=True, timeout=120)
    from PIL import Image

    review = Image.open(served.root / "outputs" / f"job-{served.job:06d}" / "review.png")
    assert f'data-loaded="{review.width}"' in page.stdout
    shot = tmp_path / "job.png"
    subprocess.run([*headless, f"--screenshot={shot}", "--window-size=1200,1400",
                    f"{served.base}/jobs/{served.job}"], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (1400, 1200, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, table, image: not blank
