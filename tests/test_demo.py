"""``vcemri demo``, the README's first command: the whole product on loopback with the
embedded defaults and the shipped model, run as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

import pydicom


def test_the_demo_delivers_a_labelled_synthetic_study_to_its_tps(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VCEMRI_")}
    done = subprocess.run([sys.executable, "-m", "vcemri", "demo", "--out", str(tmp_path),
                           "--slices", "12"], capture_output=True, text=True, timeout=280,
                          env=env, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "4/4 done" in done.stdout and "Traceback" not in done.stderr
    received = [pydicom.dcmread(p) for p in sorted((tmp_path / "tps").glob("*.dcm"))]
    kinds = Counter(ds.Modality for ds in received)
    assert kinds == {"MR": 12, "RTSTRUCT": 1, "OT": 1} or kinds == {"MR": 12, "OT": 1}, kinds
    arrived = re.search(r"arrived at the TPS: (.*) in ", done.stdout)
    assert arrived and f"{kinds['MR']} MR" in arrived.group(1)
    t1w = pydicom.dcmread(sorted((tmp_path / "patient").rglob("t1w/*.dcm"))[0])
    for ds in received:
        assert ds.StudyInstanceUID == t1w.StudyInstanceUID
        assert "SYNTHETIC" in ds.SeriesDescription.upper()
        assert "ContrastBolusAgent" not in ds
        if ds.Modality != "RTSTRUCT":  # SyntheticData is an image attribute (General Image)
            assert ds.SyntheticData == "YES"
    assert (tmp_path / "node" / "outputs").is_dir()
    assert "review image:" in done.stdout and "job:" in done.stdout and "(done)" in done.stdout


def test_the_scale_out_demo_runs_the_job_on_a_celery_worker(tmp_path):
    """``vcemri demo --scale-out``: the same demo on a private redis-server and two ``vcemri
    worker`` processes; it says which worker synthesized, the TPS gets the series, and the
    workers and Redis are gone afterwards (their logs say they shut down warm)."""
    from support.tools import require

    require("redis-server")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VCEMRI_")}
    done = subprocess.run([sys.executable, "-m", "vcemri", "demo", "--out", str(tmp_path),
                           "--slices", "8", "--scale-out"], capture_output=True, text=True,
                          timeout=280, env=env, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    worker = re.search(r"synthesized by: +Celery worker (demo-worker-\d)@", done.stdout)
    assert worker, done.stdout
    kinds = Counter(pydicom.dcmread(p, stop_before_pixels=True).Modality
                    for p in (tmp_path / "tps").glob("*.dcm"))
    assert kinds["MR"] == 8, kinds
    log = (tmp_path / f"{worker.group(1)}.log").read_text()
    assert "job 1: synthesizing on" in log and "Warm shutdown" in log
    assert not (tmp_path / "node" / "outputs" / ".staging").exists() or not any(
        (tmp_path / "node" / "outputs" / ".staging").iterdir())
