"""The DICOM node with real peers: dcmtk storescu as the scanner, dcmtk storescp and Orthanc as
the TPS/PACS, Orthanc as a hospital router; kill -9 and restart, a TPS that is down, TLS, a
full disk, bad input, every transfer syntax the node accepts.

The TPS stand-in counts every C-STORE it accepts (``StoreSCP.assert_each_once``): "every
instance once" is checked as a count, not as a set of UIDs."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from support.commitment_peer import LosingPACS
from support.dcmtk import StoreSCP, storescu
from support.faults import FullDisk
from support.models import make_checkpoint
from support.node import (
    NodeProcess,
    finished_jobs,
    jobs,
    query,
    start_node,
    wait_for,
    write_config,
)
from support.processes import free_port
from support.tools import require

import config
import dicom_node
from simulation import SimulationOptions, simulate_cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("node-cohort")
    simulate_cohort(out, SimulationOptions(
        institutions=("inst2",), patients_per_institution=2, matrix_scale=0.25, slices=8),
        workers=1)
    make_checkpoint(out / "model.safetensors", out, ("inst2",))
    return out


def _series(cohort: Path, patient: int = 1) -> tuple[list[Path], list[Path]]:
    folder = cohort / "inst2" / f"inst2-{patient:03d}"
    return sorted((folder / "t1w").glob("*.dcm")), sorted((folder / "t2w").glob("*.dcm"))


def _interleaved(cohort: Path, patient: int = 1) -> list[Path]:
    t1, t2 = _series(cohort, patient)
    return [f for pair in zip(t1, t2) for f in pair]


def _dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta information (what travels in a C-STORE): the preamble
    and 'DICM' (132 bytes), the group length element (12 bytes), then that many bytes."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00"
    return raw[144 + int.from_bytes(raw[140:144], "little"):]


def _offline(cohort: Path, tmp_path: Path, **sections: object) -> SimpleNamespace:
    """The node's parts without the network (configuration, spool, queue, assembler), for
    tests that drive series assembly with their own clock."""
    root = tmp_path / "root"
    cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors", **sections)
    settings = config.load_settings(cfg)
    queue = dicom_node.JobQueue(root)
    return SimpleNamespace(root=root, cfg=cfg, settings=settings, queue=queue,
                           spool=dicom_node.Spool(settings),
                           assembler=dicom_node.Assembler(settings, queue))


def _audit(root: Path) -> list[dict]:
    return list(config.read_audit(root / "audit.jsonl"))


def _sop_uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


# -- end to end with dcmtk ------------------------------------------------------------------


def test_storescu_to_node_to_storescp_end_to_end(cohort, tmp_path, caplog):
    """T1w and T2w interleaved in one association from dcmtk storescu; the node spools the
    bytes as received, assembles, synthesizes and delivers to dcmtk storescp. Everything it
    wrote is private (0600 files, 0700 folders) although it started under umask 022."""
    os.umask(0o022)
    caplog.set_level(logging.INFO)
    with StoreSCP(tmp_path / "tps") as tps:
        cfg = write_config(tmp_path / "node.yaml", tmp_path / "root", cohort / "model.safetensors",
                           destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1",
                                                 "port": tps.port}})
        node = start_node(cfg)
        try:
            files = _interleaved(cohort)
            sent = storescu(files, node.scp.port, called_ae="VCEMRI", calling_ae="MR_SCANNER")
            assert sent.ok, sent.output
            job = wait_for(lambda: finished_jobs(tmp_path / "root"), 90, "the job")[0]
        finally:
            node.stop()
        assert job["state"] == "done", job["reason"]
        outputs = query(tmp_path / "root", "SELECT * FROM outputs")
        received = tps.received()
        tps.assert_each_once(o["sop_instance_uid"] for o in outputs)
        modalities = sorted(pydicom.dcmread(f, stop_before_pixels=True).Modality
                            for f in received)
        assert modalities.count("MR") == 8 and "RTSTRUCT" in modalities
        # in arrival order: the images before the structure set and the review that use them
        arrival = [pydicom.dcmread(f, stop_before_pixels=True).Modality
                   for f in sorted(received, key=lambda f: f.stat().st_mtime_ns)]
        assert arrival == ["MR"] * 8 + ["RTSTRUCT", "OT"]
    spooled = query(tmp_path / "root", "SELECT * FROM instances")
    assert len(spooled) == 16
    by_uid = {r["sop_instance_uid"]: Path(r["path"]) for r in spooled}
    for original in files:
        uid = str(pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID)
        assert _dataset_bytes(by_uid[uid]) == _dataset_bytes(original)  # not re-encoded
    events = [e["event"] for e in _audit(tmp_path / "root")]
    for expected in ("association.accepted", "association.released", "series.complete",
                     "job.ready", "job.running", "job.synthesized", "job.sending", "job.done",
                     "instance.sent"):
        assert expected in events
    released = [e for e in _audit(tmp_path / "root") if e["event"] == "association.released"
                and e["calling_ae"] == "MR_SCANNER"]
    assert released[0]["count"] == 16
    assert config.verify_audit(tmp_path / "root" / "audit.jsonl").ok
    # one INFO line per step, each with the job id
    steps = [r.getMessage() for r in caplog.records if r.name.startswith("dicom_node")]
    number = job["id"]
    for expected in (f"job {number} ready: study", f"job {number} running: model",
                     f"job {number} synthesized in", f"job {number}: 10 objects sent to tps"):
        assert any(m.startswith(expected) for m in steps), (expected, steps)
    assert sum("complete: 8 instances" in m for m in steps) == 2
    [started] = [e for e in _audit(tmp_path / "root") if e["event"] == "node.started"]
    assert "peer_port" not in started and started["listen_port"] > 0  # its own, not a peer's
    written = list((tmp_path / "root").rglob("*"))
    names = {p.name for p in written}
    assert {"node.sqlite", "node.sqlite-wal", "audit.jsonl", "review.dcm"} <= names
    loose = [f"{p.relative_to(tmp_path)} {stat.S_IMODE(p.stat().st_mode):o}" for p in written
             if stat.S_IMODE(p.stat().st_mode) != (0o700 if p.is_dir() else 0o600)]
    assert loose == []
    assert stat.S_IMODE((tmp_path / "root").stat().st_mode) == 0o700


def test_a_second_node_on_the_same_storage_is_refused_naming_the_first(cohort, tmp_path):
    cfg = write_config(tmp_path / "node.yaml", tmp_path / "root", cohort / "model.safetensors")
    first = dicom_node.Node(config.load_settings(cfg), workers=0)
    try:
        with pytest.raises(config.StorageError, match=f"another vcemri node \\(PID "
                           f"{os.getpid()}\\) is using the storage folder"):
            dicom_node.Node(config.load_settings(cfg), workers=0)
        # `vcemri serve` on the same folder says so and exits without touching the jobs
        done = subprocess.run([sys.executable, "-m", "vcemri", "--config", str(cfg), "serve"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert f"another vcemri node (PID {os.getpid()}) is using" in done.stderr
        assert "stop that node, or give this one its own storage.root" in done.stderr
    finally:
        first.stop()
    # The lock goes with its holder (a stopped node, or a process killed with -9).
    dicom_node.Node(config.load_settings(cfg), workers=0).stop()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, dicom_node, config; "
        f"dicom_node.Node(config.load_settings({str(cfg)!r}), workers=0); "
        "print('held', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(config.StorageError, match=f"PID {holder.pid}"):
        dicom_node.Node(config.load_settings(cfg), workers=0)
    holder.kill()
    holder.wait(10)
    dicom_node.Node(config.load_settings(cfg), workers=0).stop()


def test_resent_series_is_idempotent(cohort, tmp_path):
    with StoreSCP(tmp_path / "tps") as tps:
        cfg = write_config(tmp_path / "node.yaml", tmp_path / "root", cohort / "model.safetensors",
                           destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1",
                                                 "port": tps.port}})
        node = start_node(cfg)
        try:
            t1, t2 = _series(cohort)
            assert storescu(t1 + t2, node.scp.port, called_ae="VCEMRI").ok
            wait_for(lambda: finished_jobs(tmp_path / "root"), 90, "the job")
            outputs = [o["sop_instance_uid"] for o in query(tmp_path / "root",
                                                           "SELECT * FROM outputs")]
            tps.assert_each_once(outputs)
            assert storescu(t1, node.scp.port, called_ae="VCEMRI").ok  # the scanner resends
            time.sleep(2.5)  # longer than the series idle time: it completes again
        finally:
            node.stop()
        assert len(jobs(tmp_path / "root")) == 1
        assert len(query(tmp_path / "root", "SELECT * FROM instances")) == 16
        tps.assert_each_once(outputs)  # nothing delivered a second time


def test_a_resent_uid_with_other_bytes_is_a_new_version_whose_results_supersede_the_first(
        cohort, tmp_path, orthanc):
    """A T1w slice resent (storescu) with other pixels under its SOP Instance UID after the
    study was delivered: the first file stays byte for byte (a job used it), the new bytes are
    kept as a version of their own and audited, the series gets a second job whose objects
    have new UIDs, and its synthetic series and RTSTRUCT say which series they supersede and
    why; the TPS (storescp) receives every object of both jobs exactly once, and a PACS that
    keeps the first copy of a UID (Orthanc) holds both series, each with its own pixels."""
    root = tmp_path / "root"
    t1, t2 = _series(cohort)
    changed = pydicom.dcmread(t1[3])
    pixels = changed.pixel_array.copy()
    pixels[10:20, 10:20] += 50
    changed.PixelData = pixels.tobytes()
    changed.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    with StoreSCP(tmp_path / "tps") as tps:
        cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors",
                           destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1",
                                                 "port": tps.port},
                                         "pacs": {"ae_title": orthanc.ae_title,
                                                  "host": "127.0.0.1",
                                                  "port": orthanc.dicom_port}})
        node = start_node(cfg)
        try:
            assert storescu(t1 + t2, node.scp.port, called_ae="VCEMRI").ok
            wait_for(lambda: finished_jobs(root), 90, "the first job")
            [spooled] = [Path(r["path"]) for r in query(
                root, "SELECT path FROM instances WHERE sop_instance_uid = ?",
                str(changed.SOPInstanceUID))]
            before = spooled.read_bytes()
            assert _dataset_bytes(spooled) == _dataset_bytes(t1[3])
            assert storescu([tmp_path / "changed.dcm"], node.scp.port, called_ae="VCEMRI").ok
            wait_for(lambda: len(finished_jobs(root)) == 2, 120, "the second job")
        finally:
            node.stop()
        first, second = sorted(jobs(root), key=lambda j: j["id"])
        assert [first["state"], second["state"]] == ["done", "done"], second["reason"]
        # the first version is untouched; the second sits beside it, both indexed
        assert spooled.read_bytes() == before
        [current] = query(root, "SELECT path, sha256 FROM instances WHERE sop_instance_uid = ?",
                          str(changed.SOPInstanceUID))
        assert Path(current["path"]).parent.name == "versions"
        assert _dataset_bytes(Path(current["path"])) == _dataset_bytes(tmp_path / "changed.dcm")
        [kept] = query(root, "SELECT path FROM instance_versions")
        assert Path(kept["path"]) == spooled
        [replaced] = [e for e in _audit(root) if e["event"] == "instance.replaced"]
        assert replaced["sop_instance_uid"] == str(changed.SOPInstanceUID)
        outputs = query(root, "SELECT * FROM outputs ORDER BY job_id, position")
        tps.assert_each_once(o["sop_instance_uid"] for o in outputs)
        by_job = {job["id"]: [o for o in outputs if o["job_id"] == job["id"]]
                  for job in (first, second)}
        assert not ({o["sop_instance_uid"] for o in by_job[first["id"]]}
                    & {o["sop_instance_uid"] for o in by_job[second["id"]]})
        old_series, new_series = (
            pydicom.dcmread(next(o["path"] for o in by_job[job["id"]] if "synthetic" in o["path"]),
                            stop_before_pixels=True) for job in (first, second))
        assert "supersedes" not in old_series.SeriesDescription
        assert re.fullmatch(r"VCE-MRI SYNTHETIC \(.+\) \(supersedes \d{4}-\d\d-\d\d \d\d:\d\d\)",
                            new_series.SeriesDescription), new_series.SeriesDescription
        assert len(new_series.SeriesDescription) <= 64
        note = (f"Supersedes the synthetic series {old_series.SeriesInstanceUID} of ")
        assert note in new_series.DerivationDescription and note in new_series.ImageComments
        assert "the T1w 1 instance resent with other content" in new_series.DerivationDescription
        rtstruct = [o["path"] for o in by_job[second["id"]] if o["path"].endswith("rtstruct.dcm")]
        for path in rtstruct:  # written when a helper is not empty
            structure = pydicom.dcmread(path)
            assert "supersedes" in structure.SeriesDescription
            assert note in structure.StructureSetDescription
        result = json.loads(second["result"])
        assert result["outputs"]["supersedes"]["series_uid"] == old_series.SeriesInstanceUID
        # Orthanc holds both synthetic series, each with the node's pixels for its job
        held = {}
        for instance in orthanc.instances():
            tags = orthanc.tags(instance)
            if "SYNTHETIC" in tags.get("SeriesDescription", "") and tags["Modality"] == "MR":
                held[tags["SOPInstanceUID"]] = instance
        for job in (first, second):
            synthetic = [o for o in by_job[job["id"]] if "synthetic" in o["path"]]
            assert {o["sop_instance_uid"] for o in synthetic} <= held.keys()
            sample = synthetic[len(synthetic) // 2]
            with urllib.request.urlopen(
                    f"{orthanc.url}/instances/{held[sample['sop_instance_uid']]}/file",
                    timeout=30) as response:
                pacs_copy = pydicom.dcmread(io.BytesIO(response.read()))
            assert pacs_copy.PixelData == pydicom.dcmread(sample["path"]).PixelData
        assert "superseding the synthetic series of" in second["reason"] or any(
            "superseding" in (t["reason"] or "") for t in query(
                root, "SELECT reason FROM transitions WHERE job_id = ?", second["id"]))


# -- transfer syntaxes --------------------------------------------------------------------------

#: How each transfer syntax is made from the simulated series (16-bit unsigned, explicit VR
#: little endian, RescaleSlope 2.4): a dcmtk tool and its options, or None for JPEG 2000,
#: which dcmtk cannot encode (pydicom with pylibjpeg-openjpeg does). JPEG baseline holds 8
#: bits per sample and JPEG extended 12 (ISO 10918-1), so 16-bit MR cannot travel in them
#: unchanged: for baseline dcmcjpeg scales the pixel range into 8 bits and keeps scanner units
#: by writing the scale as RescaleSlope (+rm); for extended it applies the modality rescale
#: (values up to about 820 fit 12 bits). +un keeps our SOP Instance UIDs (dcmcjpeg would draw
#: random ones for lossy output).
ENCODERS: dict[str, tuple[str, ...] | None] = {
    JPEGBaseline8Bit: ("dcmcjpeg", "+eb", "+rm", "+un"),
    JPEGExtended12Bit: ("dcmcjpeg", "+ee", "+un"),
    JPEGLSNearLossless: ("dcmcjpls", "+en", "+un"),
    JPEG2000: None,
    RLELossless: ("dcmcrle",),
    DeflatedExplicitVRLittleEndian: ("dcmconv", "+td"),
    ExplicitVRBigEndian: ("dcmconv", "+tb"),
}


def _encoded_study(cohort: Path, folder: Path, syntax: str) -> list[Path]:
    """Patient 1's T1w and T2w as a study of their own (study, series, instance and frame of
    reference UIDs derived from ``syntax``), encoded in ``syntax``."""
    plain, encoded = folder / "plain", folder / "encoded"
    plain.mkdir(parents=True)
    encoded.mkdir()
    files = []
    for original in _interleaved(cohort):
        ds = pydicom.dcmread(original)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                        "FrameOfReferenceUID"):
            setattr(ds, keyword, generate_uid(entropy_srcs=[syntax, str(ds[keyword].value)]))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        name = f"{original.parent.name}-{original.name}"
        target = encoded / name
        encoder = ENCODERS[syntax]
        if encoder is None:  # lossy JPEG 2000, 5:1, labelled as a lossy encoder labels it
            pixels = ds.pixel_array
            ds.compress(JPEG2000, j2k_cr=[5])
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionRatio = 5
            ds.LossyImageCompressionMethod = "ISO_15444_1"
            ds.save_as(target, enforce_file_format=True)
            assert not np.array_equal(pydicom.dcmread(target).pixel_array, pixels)  # lossy
        else:
            ds.save_as(plain / name, enforce_file_format=True)
            tool, *options = encoder
            subprocess.run([str(require(tool)), *options, str(plain / name), str(target)],
                           check=True, capture_output=True, timeout=60)
        meta = pydicom.filereader.read_file_meta_info(target)
        assert meta.TransferSyntaxUID == syntax, f"{encoder} wrote {meta.TransferSyntaxUID}"
        files.append(target)
    return files


def _sent_bytes(path: Path) -> bytes:
    """The data set bytes storescu puts on the wire for ``path``: the file's bytes after its
    meta information, except that storescu pads a deflated stream of odd length with a NUL
    (DICOM data sets have even length) where dcmconv wrote the file unpadded."""
    data = _dataset_bytes(path)
    deflated = pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID \
        == DeflatedExplicitVRLittleEndian
    return data + b"\0" if deflated and len(data) % 2 else data


def test_every_accepted_transfer_syntax_is_spooled_as_sent_and_processed(cohort, tmp_path):
    """JPEG baseline and extended, JPEG-LS near-lossless, JPEG 2000 (lossy), RLE, deflated and
    big endian: each a study of its own, sent by dcmtk storescu in that syntax. Every instance
    is acknowledged and spooled byte for byte as it travelled, and every study is processed
    and delivered."""
    studies = {syntax: _encoded_study(cohort, tmp_path / "studies" / syntax, syntax)
               for syntax in ENCODERS}
    study_uids = {str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID):
                  syntax for syntax, files in studies.items()}
    root = tmp_path / "root"
    with StoreSCP(tmp_path / "tps") as tps:
        cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors",
                           destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1",
                                                 "port": tps.port}})
        node = start_node(cfg)
        try:
            for syntax, files in studies.items():
                sent = storescu(files, node.scp.port, called_ae="VCEMRI",
                                transfer_syntax=syntax)
                assert sent.ok, f"{syntax.name}: {sent.output}"
            wait_for(lambda: len(finished_jobs(root)) == len(studies), 240, "every study's job")
        finally:
            node.stop()
        outputs = [o["sop_instance_uid"] for o in query(root, "SELECT * FROM outputs")]
        tps.assert_each_once(outputs)
    assert not [e for e in _audit(root) if e["event"] == "instance.refused"]
    spooled = {r["sop_instance_uid"]: r for r in query(root, "SELECT * FROM instances")}
    for syntax, files in studies.items():
        for path in files:
            row = spooled[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)]
            assert row["transfer_syntax_uid"] == syntax, syntax.name
            assert _dataset_bytes(Path(row["path"])) == _sent_bytes(path), \
                f"{syntax.name}: {path.name} spooled differently from what was sent"
    outcomes = {study_uids[j["study_uid"]].name: (j["state"], j["reason"]) for j in jobs(root)}
    assert sorted(outcomes) == sorted(s.name for s in studies)
    assert all(state == "done" for state, _ in outcomes.values()), outcomes


# -- a hospital router and a PACS -------------------------------------------------------------


def test_orthanc_forwards_a_study_and_receives_the_results(cohort, tmp_path, orthanc):
    cfg = write_config(tmp_path / "node.yaml", tmp_path / "root", cohort / "model.safetensors",
                       destinations={"pacs": {"ae_title": orthanc.ae_title, "host": "127.0.0.1",
                                              "port": orthanc.dicom_port}},
                       dicom={"allowed_calling_aes": ["ORTHANC"]})
    node = start_node(cfg)
    try:
        for f in _interleaved(cohort):
            orthanc.upload(f)
        study = orthanc.get("/studies")[0]
        orthanc._request("PUT", "/modalities/vcemri", json.dumps(
            {"AET": "VCEMRI", "Host": "127.0.0.1", "Port": node.scp.port}).encode())
        orthanc.post("/modalities/vcemri/store", {"Resources": [study], "Synchronous": True})
        job = wait_for(lambda: finished_jobs(tmp_path / "root"), 90, "the job")[0]
    finally:
        node.stop()
    assert job["state"] == "done", job["reason"]
    series = orthanc.get(f"/studies/{study}/series")
    descriptions = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
    assert len(orthanc.get("/studies")) == 1  # results joined the T1w's study
    assert descriptions.count("MR") == 3 and "RTSTRUCT" in descriptions
    synthetic = [s for s in series if s["MainDicomTags"].get("Modality") == "MR"
                 and "SYNTHETIC" in s["MainDicomTags"].get("SeriesDescription", "")]
    assert len(synthetic) == 1 and len(synthetic[0]["Instances"]) == 8


def test_a_job_is_done_only_when_orthanc_commits_every_object(cohort, tmp_path, orthanc):
    """Storage commitment with a real peer: Orthanc (Storage Commitment SCP) is asked for the
    job's objects after they are stored and reports on an association of its own toward the
    node; the job is done only then, and its reason, result and audit say so."""
    root = tmp_path / "root"
    cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors",
                       destinations={"pacs": {"ae_title": orthanc.ae_title, "host": "127.0.0.1",
                                              "port": orthanc.dicom_port,
                                              "storage_commitment": True}},
                       dicom={"allowed_calling_aes": ["MR_SCANNER"]})
    node = start_node(cfg)
    try:
        orthanc._request("PUT", "/modalities/vcemri", json.dumps(
            {"AET": "VCEMRI", "Host": "127.0.0.1", "Port": node.scp.port}).encode())
        assert storescu(_interleaved(cohort), node.scp.port, called_ae="VCEMRI",
                        calling_ae="MR_SCANNER").ok
        job = wait_for(lambda: finished_jobs(root), 90, "the job")[0]
        # the reporting AE may not store: it is allowed in for its reports only
        refused = storescu(_series(cohort)[0][:1], node.scp.port, called_ae="VCEMRI",
                           calling_ae=orthanc.ae_title)
    finally:
        node.stop()
    assert job["state"] == "done", job["reason"]
    assert job["reason"] == "10 objects delivered to pacs; committed by pacs"
    [asked] = query(root, "SELECT * FROM commitments")
    assert (asked["state"], asked["count"], asked["called_ae"]) == ("committed", 10, "ORTHANC")
    assert json.loads(job["result"])["commitments"] == {"pacs": asked["transaction_uid"]}
    waited = [t["reason"] for t in query(root, "SELECT * FROM transitions WHERE job_id = ?",
                                         job["id"]) if t["state"] == "sending"]
    assert any(f"waiting for pacs's storage commitment report (transaction "
               f"{asked['transaction_uid']})" in (r or "") for r in waited)
    assert len(orthanc.instances()) == 10
    assert "N-EVENT-REPORT" not in orthanc.log()  # Orthanc read our response
    shown = subprocess.run([sys.executable, "-m", "vcemri", "--config", str(cfg), "jobs", "show",
                            str(job["id"])], capture_output=True, text=True, timeout=60)
    assert (f"delivered to pacs: 10 of 10; committed all 10 objects (transaction "
            f"{asked['transaction_uid']})") in shown.stdout, shown.stdout + shown.stderr
    [report] = [e for e in _audit(root) if e["event"] == "commitment.reported"]
    assert (report["outcome"], report["calling_ae"], report["count"]) == ("success", "ORTHANC", 10)
    [stray] = [e for e in _audit(root) if e["event"] == "instance.refused"]
    assert stray["calling_ae"] == "ORTHANC" and "only to report" in stray["reason"]
    assert len(query(root, "SELECT * FROM instances")) == 16  # nothing stored from ORTHANC
    assert not refused.ok


def test_objects_a_peer_does_not_commit_are_sent_again_then_the_job_fails_naming_them(
        cohort, tmp_path):
    """A PACS that acknowledges the review image and loses it: the job is not done; the
    uncommitted object is named, sent again and commitment asked again. Lost once: done at the
    second report. Lost every time: the job fails at jobs.send_max_age_s naming it."""
    root = tmp_path / "root"
    lost: Counter[str] = Counter()

    def lose(dataset) -> bool:
        if dataset.Modality != "OT" or (lost[dataset.StudyInstanceUID] and not always.is_set()):
            return False
        lost[dataset.StudyInstanceUID] += 1
        return True

    always = threading.Event()
    with LosingPACS(lose=lose) as pacs:
        cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors",
                           destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1",
                                                  "port": pacs.port,
                                                  "storage_commitment": True}},
                           jobs={"send_max_age_s": 8.0})
        node = start_node(cfg)
        pacs.reply_to = ("127.0.0.1", node.scp.port, "VCEMRI")
        try:
            assert storescu(_interleaved(cohort), node.scp.port, called_ae="VCEMRI").ok
            first = wait_for(lambda: finished_jobs(root), 90, "the first job")[0]
            always.set()
            assert storescu(_interleaved(cohort, 2), node.scp.port, called_ae="VCEMRI").ok
            second = wait_for(lambda: len(finished_jobs(root)) == 2 and finished_jobs(root)[1],
                              90, "the second job")
        finally:
            node.stop()
    review = {j: [o["sop_instance_uid"] for o in query(
        root, "SELECT * FROM outputs WHERE job_id = ?", j) if o["path"].endswith("review.dcm")][0]
        for j in (first["id"], second["id"])}
    assert first["state"] == "done", first["reason"]
    retried = [t["reason"] for t in query(root, "SELECT * FROM transitions WHERE job_id = ?",
                                          first["id"]) if "did not commit" in (t["reason"] or "")]
    assert len(retried) == 1
    assert (f"pacs did not commit 1 of 10 objects: {review[first['id']]} (no such object "
            "instance); sending them again; retrying in") in retried[0]
    sent = {uid: pacs.stored[uid] for uid in (o["sop_instance_uid"] for o in query(
        root, "SELECT * FROM outputs WHERE job_id = ?", first["id"]))}
    assert sent.pop(review[first["id"]]) == 2 and set(sent.values()) == {1}  # once, the lost twice
    assert second["state"] == "failed"
    assert (f"pacs did not commit 1 of 10 objects: {review[second['id']]} (no such object "
            "instance)") in second["reason"]
    assert "gave up after" in second["reason"]
    assert [t for t, _ in pacs.reports][:2] == [2, 1]
    outcomes = [e["outcome"] for e in _audit(root) if e["event"] == "commitment.reported"]
    assert outcomes[:2] == ["failure", "success"] and set(outcomes[2:]) == {"failure"}


# -- refusals ---------------------------------------------------------------------------------


def test_unknown_calling_ae_and_wrong_called_ae_are_rejected_with_a_reason(cohort, tmp_path):
    cfg = write_config(tmp_path / "node.yaml", tmp_path / "root", cohort / "model.safetensors",
                       dicom={"allowed_calling_aes": ["MR_SCANNER"]})
    node = start_node(cfg)
    try:
        t1, _ = _series(cohort)
        intruder = storescu(t1[:1], node.scp.port, called_ae="VCEMRI", calling_ae="INTRUDER")
        misdirected = storescu(t1[:1], node.scp.port, called_ae="OTHER", calling_ae="MR_SCANNER")
        allowed = storescu(t1[:1], node.scp.port, called_ae="VCEMRI", calling_ae="MR_SCANNER")
    finally:
        node.stop()
    assert not intruder.ok and not misdirected.ok and allowed.ok
    rejected = [e for e in _audit(tmp_path / "root") if e["event"] == "association.rejected"]
    reasons = {e["calling_ae"]: e["reason"] for e in rejected}
    assert "'INTRUDER' is not in dicom.allowed_calling_aes" in reasons["INTRUDER"]
    assert "called AE title 'OTHER' is not ours" in reasons["MR_SCANNER"]
    assert len(query(tmp_path / "root", "SELECT * FROM instances")) == 1


def test_garbage_bad_uids_and_truncated_pixels_are_refused_before_success(cohort, tmp_path):
    from pynetdicom import AE

    cfg = write_config(tmp_path / "node.yaml", tmp_path / "root", cohort / "model.safetensors")
    node = start_node(cfg)
    try:
        t1, t2 = _series(cohort, 2)
        # a path-traversal attempt in a UID: refused before it names a file
        evil = pydicom.dcmread(t1[0])
        evil.SeriesInstanceUID = "../../../etc"
        ae = AE(ae_title="MR_SCANNER")
        ae.add_requested_context(evil.SOPClassUID, evil.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="VCEMRI")
        assert assoc.is_established
        status = assoc.send_c_store(evil)
        # pixel data shorter than Rows x Columns x bits: refused, never acknowledged
        short = pydicom.dcmread(t1[3])
        short.PixelData = short.PixelData[: len(short.PixelData) // 2]
        short_status = assoc.send_c_store(short)
        assoc.release()
        assert status.Status == 0xC000
        assert short_status.Status == 0xC000
        # garbage straight into the spool: refused with the reason
        refused = node.spool.store(b"this is not DICOM" * 10, "MR_SCANNER")
        assert refused.status == 0xC000 and "cannot be decoded" in refused.reason
        # a file cut 3,000 bytes short in transfer (as it reaches the spool)
        whole = t1[4].read_bytes()
        cut = node.spool.store(whole[:-3000], "MR_SCANNER")
        assert cut.status == 0xC000 and "truncated in transfer" in cut.reason
        assert node.spool.store(whole, "MR_SCANNER").status == 0x0000
    finally:
        node.stop()
    assert not list((tmp_path / "root" / "spool").rglob("*.tmp"))
    assert not list((tmp_path / "root" / "spool").rglob("etc*"))
    stored = {r["sop_instance_uid"] for r in query(tmp_path / "root", "SELECT * FROM instances")}
    assert str(short.SOPInstanceUID) not in stored
    refusals = [e for e in _audit(tmp_path / "root") if e["event"] == "instance.refused"]
    assert refusals and "SeriesInstanceUID" in refusals[0]["reason"]
    assert refusals[0]["status"] == "0xC000"
    assert "the pixel data holds" in refusals[1]["reason"] and "need" in refusals[1]["reason"]


def test_a_study_missing_its_t2w_fails_with_the_reason_and_a_late_t2w_restarts_it(
        cohort, tmp_path):
    node = _offline(cohort, tmp_path, assembly={"series_idle_s": 0.5, "study_timeout_s": 2.0})
    spool, queue, assembler = node.spool, node.queue, node.assembler
    t1, t2 = _series(cohort)
    for f in t1:
        assert spool.store(f.read_bytes(), "MR").status == 0
    now = time.time() + 1.0  # past the series idle time
    assembler.tick(now)
    assert [(j.state, j.reason) for j in queue.list()] == [("waiting", "T2w series not received")]
    assembler.tick(now + 5)
    failed = queue.list()[0]
    assert failed.state == "failed" and failed.reason == "T2w series not received within 2 s"
    for f in t2:
        spool.store(f.read_bytes(), "MR")
    assembler.tick(time.time() + 1)
    newest = queue.list()[0]
    assert newest.id != failed.id and newest.state == "ready" and newest.route == "default"


def _with(files: list[Path], folder: Path, **values: object) -> list[Path]:
    """Copies of ``files`` in ``folder`` with these attributes set (e.g. ImagesInAcquisition)."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in files:
        dataset = pydicom.dcmread(path)
        for keyword, value in values.items():
            setattr(dataset, keyword, value)
        dataset.save_as(folder / path.name)
        copies.append(folder / path.name)
    return copies


def test_a_series_with_a_gap_or_short_of_its_count_waits_then_fails_and_the_rest_completes_it(
        cohort, tmp_path):
    """A T1w missing its 4th slice (a gap in the slice positions) and a T2w with 6 of the 8
    instances its header announces are not processed when they go quiet: the study waits
    with the reason, fails with it after assembly.incomplete_wait_s, and the missing
    instances, when they arrive, make the study whole and ready."""
    node = _offline(cohort, tmp_path, assembly={"series_idle_s": 0.5, "study_timeout_s": 60.0,
                                                "incomplete_wait_s": 3.0})
    spool, queue, assembler = node.spool, node.queue, node.assembler
    t1, t2 = _series(cohort)
    t2 = _with(t2, tmp_path / "t2", ImagesInAcquisition=len(t2))
    first = [f for i, f in enumerate(t1) if i != 3] + t2[:6]
    for f in first:
        assert spool.store(f.read_bytes(), "MR").status == 0
    now = time.time()
    assembler.tick(now + 1.0)  # idle, not yet waited out
    [job] = queue.list()
    assert job.state == "waiting"
    assert "T1w series incomplete (a gap between its slice positions" in job.reason
    assert "T2w series incomplete (6 of the 8 instances its header announces" in job.reason
    assembler.tick(now + 4.0)
    [failed] = queue.list()
    assert failed.state == "failed", failed.reason
    assert re.search(r"the T1w series \S+ has a gap between its slice positions: [\d.]+ mm "
                     r"from -?[\d.]+ to -?[\d.]+ mm where its slices are [\d.]+ mm apart "
                     r"\(about 1 slice\(s\) missing\)", failed.reason), failed.reason
    assert "the T2w series" in failed.reason and "send the whole series again" in failed.reason
    for f in [t1[3], *t2[6:]]:
        assert spool.store(f.read_bytes(), "MR").status == 0
    assembler.tick(time.time() + 1.0)
    newest = queue.list()[0]
    assert newest.id != failed.id and newest.state == "ready", newest.reason
    assert [len(newest.inputs[r]) for r in ("t1w", "t2w")] == [len(t1), len(t2)]


def test_a_route_may_set_its_series_idle_time_and_expected_counts(cohort, tmp_path):
    """A scanner whose route expects 8-slice T1w and T2w series: its study is ready at its
    last instance, with no idle time; another scanner's route sets a 2 s idle time against
    the node's 60 s; a third scanner, with no route of its own, waits the node's 60 s."""
    routes = [{"name": "counted", "match": {"calling_ae": "^FAST$"}, "destinations": ["tps"],
               "expected_instances": {"t1w": 8, "t2w": 8, "dwi": 4}},
              {"name": "quick", "match": {"calling_ae": "^QUICK$"}, "destinations": ["tps"],
               "series_idle_s": 2.0},
              {"name": "default", "destinations": ["tps"]}]
    node = _offline(cohort, tmp_path, routes=routes,
                    assembly={"series_idle_s": 60.0, "study_timeout_s": 600.0})
    spool, queue, assembler = node.spool, node.queue, node.assembler
    now = time.time()
    t1, t2 = _series(cohort)

    def as_stir(path: Path) -> bytes:  # a STIR stands in for the T2w, and is counted as one
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "t2_tirm_tra"
        buffer = io.BytesIO()
        ds.save_as(buffer)
        return buffer.getvalue()

    for f in t1:
        assert spool.store(f.read_bytes(), "FAST").status == 0
    for f in t2[:7]:
        assert spool.store(as_stir(f), "FAST").status == 0
    assembler.tick(now)
    [waiting] = queue.list()
    assert waiting.state == "waiting" and "T2w series not complete" in waiting.reason
    assert spool.store(as_stir(t2[7]), "FAST").status == 0  # the last instance
    assembler.tick(now)
    [ready] = queue.list()
    assert (ready.state, ready.route) == ("ready", "counted"), ready.reason

    def as_dwi(path: Path, number: int) -> bytes:  # counted by its own role: 4, not 8
        ds = pydicom.dcmread(path)
        ds.SeriesDescription, ds.SeriesInstanceUID = "ep2d_diff_b1000", dwi_series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        buffer = io.BytesIO()
        ds.save_as(buffer)
        return buffer.getvalue()

    dwi_series = generate_uid()
    for number, f in enumerate(t2[:4], 1):
        assembler.tick(now)
        [dwi] = query(node.root, "SELECT * FROM series WHERE series_uid = ?", dwi_series) or [
            {"complete_generation": None, "role": "dwi"}]
        assert dwi["complete_generation"] is None and dwi["role"] == "dwi"
        assert spool.store(as_dwi(f, number), "FAST").status == 0
    assembler.tick(now)
    [dwi] = query(node.root, "SELECT * FROM series WHERE series_uid = ?", dwi_series)
    assert dwi["complete_generation"] == dwi["generation"] and dwi["instances"] == 4
    for ae in ("QUICK", "SLOW"):  # patient 1 again under new UIDs, from two more scanners
        study, series = generate_uid(), {}
        for f in t1 + t2:
            ds = pydicom.dcmread(f)
            ds.StudyInstanceUID, ds.PatientID = study, ae
            ds.SeriesInstanceUID = series.setdefault(str(ds.SeriesInstanceUID), generate_uid())
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            buffer = io.BytesIO()
            ds.save_as(buffer)
            assert spool.store(buffer.getvalue(), ae).status == 0
    assembler.tick(now + 3.0)
    states = {j.route or j.reason: j.state for j in queue.list()}
    assert states.get("quick") == "ready", states
    assert sum(s == "waiting" for s in states.values()) == 1  # SLOW, 60 s
    assembler.tick(now + 61.0)
    assert sorted(j.route for j in queue.list()) == ["counted", "default", "quick"]


def test_a_series_cut_off_in_transfer_is_never_delivered_as_whole(cohort, tmp_path):
    """Through storescu to a running node: a T1w whose transfer stopped after 5 of the 8
    slices it announces fails with the reason and nothing reaches the TPS; the rest sent
    later makes one job whose results the TPS receives once."""
    t1, t2 = _series(cohort, 2)
    t1 = _with(t1, tmp_path / "t1", ImagesInAcquisition=len(t1))
    root = tmp_path / "root"
    with StoreSCP(tmp_path / "tps") as tps:
        cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors",
                           assembly={"series_idle_s": 0.5, "study_timeout_s": 60.0,
                                     "incomplete_wait_s": 2.0},
                           destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1",
                                                 "port": tps.port}})
        node = start_node(cfg)
        try:
            assert storescu(t1[:5] + t2, node.scp.port, called_ae="VCEMRI").ok
            wait_for(lambda: any(j["state"] == "failed" for j in jobs(root)), 60,
                     "the cut-off study failed")
            [failed] = jobs(root)
            assert "5 of the 8 instances its header announces" in failed["reason"]
            assert tps.received() == []
            [incomplete] = [e for e in _audit(root) if e["event"] == "series.incomplete"]
            assert "5 of the 8" in incomplete["reason"]
            assert storescu(t1[5:], node.scp.port, called_ae="VCEMRI").ok
            wait_for(lambda: any(j["state"] == "done" for j in jobs(root)), 120,
                     "the whole study processed")
        finally:
            node.stop()
        outputs = query(root, "SELECT * FROM outputs")
        tps.assert_each_once(o["sop_instance_uid"] for o in outputs)
        done = [j for j in jobs(root) if j["state"] == "done"]
        assert len(done) == 1 and len(json.loads(done[0]["inputs"])["t1w"]) == len(t1)


def test_a_study_no_route_matches_is_kept_and_not_processed(cohort, tmp_path):
    node = _offline(cohort, tmp_path, routes=[{"name": "scanner-only",
                                               "match": {"calling_ae": "^MR1$"},
                                               "model": "default", "destinations": ["tps"]}])
    settings, spool, queue = node.settings, node.spool, node.queue
    t1, t2 = _series(cohort)
    for f in t1 + t2:
        spool.store(f.read_bytes(), "ROUTER")
    dicom_node.Assembler(settings, queue).tick(time.time() + 5)
    job = queue.list()[0]
    assert job.state == "rejected" and "no route matches" in job.reason
    assert "calling AE ROUTER" in job.reason
    assert len(spool.series_files(job.t1w_series_uid)) == 8  # kept


def test_a_refused_study_is_kept_announced_and_can_be_forced_through(cohort, tmp_path):
    """Screening refuses a study (its T1w says PELVIS): nothing synthetic is sent, the TPS gets
    the refusal notice, the job is rejected with the reason and every instance stays in the
    spool; ``vcemri jobs retry --force`` (audited, with the user) processes it anyway and every
    object it sends says it was refused and forced."""
    study = tmp_path / "study"
    t1, t2 = _series(cohort)
    for folder, files in (("t1w", t1), ("t2w", t2)):
        (study / folder).mkdir(parents=True)
        for f in files:
            ds = pydicom.dcmread(f)
            if folder == "t1w":
                ds.BodyPartExamined = "PELVIS"
            ds.save_as(study / folder / f.name)
    root = tmp_path / "root"
    with StoreSCP(tmp_path / "tps") as tps:
        cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors",
                           destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1",
                                                 "port": tps.port}},
                           planning={"refusal_notice": True})
        node = start_node(cfg)
        try:
            assert storescu(sorted(study.rglob("*.dcm")), node.scp.port, called_ae="VCEMRI").ok
            job = wait_for(lambda: finished_jobs(root), 90, "the job")[0]
            assert job["state"] == "rejected"
            assert "body part 'PELVIS' is not head and neck" in job["reason"]
            assert "refusal notice sent to tps" in job["reason"]
            notices = [pydicom.dcmread(p) for p in tps.received()]
            assert [ds.SeriesDescription for ds in notices] == ["VCE REFUSED: no synthetic series"]
            assert len(query(root, "SELECT * FROM instances")) == 16  # kept
            result = json.loads(job["result"])
            assert result["verdict"]["state"] == "refused"
            forced = subprocess.run(
                [sys.executable, "-m", "vcemri", "--config", str(cfg), "jobs", "retry", "--force",
                 str(job["id"])], capture_output=True, text=True, timeout=60, check=False)
            assert forced.returncode == 0, forced.stderr
            wait_for(lambda: jobs(root)[0]["state"] == "done", 90, "the forced job")
        finally:
            node.stop()
        shown = subprocess.run([sys.executable, "-m", "vcemri", "--config", str(cfg), "jobs",
                                "show", str(job["id"])], capture_output=True, text=True,
                               timeout=60, check=False)
        assert "forced through screening" in shown.stdout
        assert "verdict:      REFUSED by screening, processed anyway" in shown.stdout
        sent = [pydicom.dcmread(o["path"], stop_before_pixels=True)
                for o in query(root, "SELECT * FROM outputs WHERE path LIKE '%synthetic%'")]
        assert len(sent) == 8
        for ds in sent:
            assert "REFUSED by screening, processed anyway at an administrator's request: body " \
                   "part 'PELVIS'" in ds.ImageComments
        # the notice and then the forced job's objects, each delivered once
        tps.assert_each_once(d["sop_instance_uid"]
                             for d in query(root, "SELECT * FROM deliveries"))
        assert len(tps.receipts()) == 1 + len(query(root, "SELECT * FROM outputs"))
    forced_events = [e for e in _audit(root) if e["event"] == "job.forced"]
    assert len(forced_events) == 1 and forced_events[0]["user"]


# -- counting deliveries ----------------------------------------------------------------------


def test_a_duplicate_delivery_fails_the_each_once_check(cohort, tmp_path):
    """The check the kill -9, outage and resend tests rely on catches a sender that delivers
    an instance twice, though the set of UIDs the TPS holds stays the same: a sender that
    forgot its deliveries and sends everything again in a second association, and one that
    sends a file twice in one association (dcmtk storescu, independent of the node's code)."""
    t1, _ = _series(cohort)
    files = t1[:3]
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    with StoreSCP(tmp_path / "tps") as tps:
        assert storescu(files, tps.port, called_ae="TPS").ok
        tps.assert_each_once(uids)  # one delivery each: the check passes
        assert tps.duplicates() == {}
        assert storescu(files, tps.port, called_ae="TPS").ok  # the duplicating sender
        assert _sop_uids(tps.received()) == set(uids)  # a set comparison sees nothing wrong
        assert len(tps.receipts()) == 6
        assert tps.duplicates() == {uid: 2 for uid in uids}
        with pytest.raises(AssertionError, match=r"3 instance\(s\) received more than once"):
            tps.assert_each_once(uids)
    with StoreSCP(tmp_path / "tps-2") as tps:
        assert storescu([files[0], files[1], files[0]], tps.port, called_ae="TPS").ok
        assert tps.duplicates() == {uids[0]: 2}
        with pytest.raises(AssertionError, match=re.escape(f"{uids[0]} x2")):
            tps.assert_each_once(uids[:2])


# -- outages and crashes ----------------------------------------------------------------------


def test_a_series_that_grows_while_its_job_waits_gets_its_own_results_each_once(
        cohort, tmp_path):
    """Study B's job becomes ready with 5 of 8 slices per series while the only worker is
    busy with study A, then the rest of B arrives. The waiting job processes exactly the
    instances it was created with (not what the spool holds when it runs), its outputs are
    named after that content, the completed series gets a job and results of its own with
    other UIDs, and the TPS receives every object of every job exactly once."""
    (a1, a2), (b1, b2) = _series(cohort, 2), _series(cohort, 1)
    root = tmp_path / "root"
    with StoreSCP(tmp_path / "tps") as tps:
        cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors",
                           destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1",
                                                 "port": tps.port}})
        node = start_node(cfg)
        try:
            assert storescu(a1 + a2, node.scp.port, called_ae="VCEMRI").ok
            wait_for(lambda: any(j["state"] == "running" for j in jobs(root)), 60,
                     "study A's job running")
            assert storescu(b1[:5] + b2[:5], node.scp.port, called_ae="VCEMRI").ok
            wait_for(lambda: any(j["state"] == "ready" for j in jobs(root)), 60,
                     "study B's job ready with 5 + 5 instances")
            assert storescu(b1[5:] + b2[5:], node.scp.port, called_ae="VCEMRI").ok
            wait_for(lambda: len(finished_jobs(root)) == 3, 180, "three jobs")
        finally:
            node.stop()
        done = jobs(root)
        assert [j["state"] for j in done] == ["done"] * 3, [j["reason"] for j in done]
        partial, complete = done[1], done[2]
        assert [len(json.loads(j["inputs"])["t1w"]) for j in (partial, complete)] == [5, 8]
        outputs = query(root, "SELECT * FROM outputs")
        tps.assert_each_once(o["sop_instance_uid"] for o in outputs)
        series = {job["id"]: {pydicom.dcmread(o["path"], stop_before_pixels=True)
                              .SeriesInstanceUID for o in outputs
                              if o["job_id"] == job["id"] and "synthetic" in o["path"]}
                  for job in (partial, complete)}
        assert len(series[partial["id"]]) == len(series[complete["id"]]) == 1
        assert series[partial["id"]] != series[complete["id"]]
        counts = {job["id"]: sum(1 for o in outputs if o["job_id"] == job["id"]
                                 and "synthetic" in o["path"]) for job in (partial, complete)}
        assert counts == {partial["id"]: 5, complete["id"]: 8}
        # the complete series' results say they replace the partial ones, and why
        partial_series, complete_series = (pydicom.dcmread(next(
            o["path"] for o in outputs if o["job_id"] == job["id"] and "synthetic" in o["path"]),
            stop_before_pixels=True) for job in (partial, complete))
        assert "supersedes" not in partial_series.SeriesDescription
        assert "(supersedes " in complete_series.SeriesDescription
        assert (f"Supersedes the synthetic series {partial_series.SeriesInstanceUID} of "
                in complete_series.DerivationDescription)
        assert ("the T1w gained 3 instances; the T2w gained 3 instances"
                in complete_series.DerivationDescription)


def test_destination_down_then_back_is_delivered(cohort, tmp_path):
    tps_port = free_port()
    root = tmp_path / "root"
    cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors",
                       destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1",
                                             "port": tps_port}})
    node = start_node(cfg)
    try:
        assert storescu(_interleaved(cohort), node.scp.port, called_ae="VCEMRI").ok
        failed = wait_for(lambda: query(root, "SELECT * FROM transitions WHERE state = "
                                              "'sending' AND reason LIKE '%retrying%'"),
                          90, "a failed delivery")[0]
        sending = jobs(root)[0]
        assert sending["state"] == "sending"  # still trying, not failed
        where = f"destination tps (TPS@127.0.0.1:{tps_port})"
        for reason in (failed["reason"], sending["reason"]):
            # pynetdicom only logs why; the sender finds the cause and names it
            assert where in reason and "connection refused" in reason
            assert "retrying in" in reason
        with StoreSCP(tmp_path / "tps", port=tps_port) as tps:
            job = wait_for(lambda: finished_jobs(root), 30, "delivery after the TPS is back")[0]
            outputs = query(root, "SELECT sop_instance_uid FROM outputs")
            tps.assert_each_once(o["sop_instance_uid"] for o in outputs)
    finally:
        node.stop()
    assert job["state"] == "done"


def test_destination_down_too_long_fails_the_job_with_the_reason(cohort, tmp_path):
    root = tmp_path / "root"
    # A backoff (4 s, up to 8 s) longer than the deadline (2 s): the last try falls on the
    # deadline instead of a whole backoff after it.
    cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors",
                       jobs={"send_max_age_s": 2.0, "retry_initial_s": 4.0, "retry_max_s": 8.0})
    node = start_node(cfg)
    try:
        assert storescu(_interleaved(cohort), node.scp.port, called_ae="VCEMRI").ok
        job = wait_for(lambda: finished_jobs(root), 90, "the job to give up")[0]
    finally:
        node.stop()
    assert job["state"] == "failed"
    assert "tps" in job["reason"] and "gave up after" in job["reason"]
    waited = float(re.search(r"gave up after (\d+) s", job["reason"]).group(1))
    assert 2.0 <= waited <= 3.0


def test_kill_9_while_receiving_and_while_running_loses_and_duplicates_nothing(
        cohort, tmp_path):
    root = tmp_path / "root"
    with StoreSCP(tmp_path / "tps") as tps:
        cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors",
                           destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1",
                                                 "port": tps.port}})
        files = _interleaved(cohort) + _interleaved(cohort, 2)
        node = NodeProcess(cfg, tmp_path / "node-1.log")
        result: dict[str, object] = {}
        sender = threading.Thread(target=lambda: result.update(
            first=storescu(files, node.port, called_ae="VCEMRI")))
        sender.start()
        wait_for(lambda: len(query(root, "SELECT * FROM instances")) >= 4, 60, "4 instances")
        node.kill()  # while receiving
        sender.join()
        stored = len(query(root, "SELECT * FROM instances"))
        assert 4 <= stored < len(files) and not result["first"].ok  # type: ignore[union-attr]
        node = NodeProcess(cfg, tmp_path / "node-2.log")
        assert storescu(files, node.port, called_ae="VCEMRI").ok  # the scanner resends
        wait_for(lambda: any(j["state"] == "running" for j in jobs(root)), 60, "a running job",
                 interval=0.01)
        node.kill()  # while a job runs
        assert any(j["state"] in ("running", "sending") for j in jobs(root))
        node = NodeProcess(cfg, tmp_path / "node-3.log")
        def whole_studies_done() -> bool:
            done = [j for j in finished_jobs(root) if j["state"] == "done"
                    and len(json.loads(j["inputs"])["t1w"]) == 8]
            return len(done) == 2 and len(finished_jobs(root)) == len(jobs(root))

        try:
            wait_for(whole_studies_done, 120, "both whole studies")
        finally:
            assert node.stop() == 0  # SIGTERM: a clean exit
        received = tps.received()
        outputs = [o["sop_instance_uid"] for o in query(root, "SELECT * FROM outputs")]
        tps.assert_each_once(outputs)  # every object arrived once; UIDs are deterministic
    # A series the kill cut short and whose idle time ran out before the resend could only
    # look complete: such a job processes exactly its few instances (too few: rejected, or
    # done with its own UIDs); the whole studies each get a job of their own, done.
    whole = [j for j in jobs(root) if len(json.loads(j["inputs"])["t1w"]) == 8]
    assert [j["state"] for j in whole] == ["done", "done"]
    assert len(query(root, "SELECT * FROM instances")) == len(files)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in received]
    synthetic = {str(h.SeriesInstanceUID) for h in headers if h.Modality == "MR"}
    partial_done = [j for j in jobs(root) if j not in whole and j["state"] == "done"]
    # one synthetic series per processed content, never a duplicate series
    assert len(synthetic) == 2 + len(partial_done)
    recovered = [t for t in query(root, "SELECT * FROM transitions")
                 if t["reason"] == "resumed after the node restarted"]
    assert recovered
    assert not list((root / "spool").rglob("*.tmp"))


@contextlib.contextmanager
def _synthesizing(cohort: Path, tmp_path: Path) -> Iterator[SimpleNamespace]:
    """A running node that sends to storescp, with patient 1 sent and its job in the worker's
    synthesis process (``root``, ``cfg``, ``tps``, ``node``, ``synthesis``); stopped after."""
    root = tmp_path / "root"
    with StoreSCP(tmp_path / "tps") as tps:
        cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors",
                           destinations={"tps": {"ae_title": "TPS", "host": "127.0.0.1",
                                                 "port": tps.port}})
        node = start_node(cfg)
        try:
            assert storescu(_interleaved(cohort), node.scp.port, called_ae="VCEMRI").ok
            synthesis = node.workers[0].process
            wait_for(lambda: synthesis.job_id is not None and synthesis.pid, 90,
                     "the first job in its synthesis process", interval=0.005)
            yield SimpleNamespace(root=root, cfg=cfg, tps=tps, node=node, synthesis=synthesis)
        finally:
            node.stop()


def test_a_synthesis_process_killed_mid_job_never_stops_reception_and_the_job_is_retried(
        cohort, tmp_path):
    """kill -9 of the worker's synthesis process while it works on one study and while a
    scanner sends another: every instance of the second is received, the first job is retried
    in a new process (its transition names the signal), both are delivered, each object once."""
    with _synthesizing(cohort, tmp_path) as running:
        root, node, synthesis = running.root, running.node, running.synthesis
        victim = synthesis.pid
        result: dict[str, object] = {}
        scanner = threading.Thread(target=lambda: result.update(
            second=storescu(_interleaved(cohort, 2), node.scp.port, called_ae="VCEMRI")))
        scanner.start()
        os.kill(victim, signal.SIGKILL)
        scanner.join()
        assert result["second"].ok, result["second"]  # type: ignore[attr-defined]
        done = wait_for(lambda: len(finished_jobs(root)) == 2 and finished_jobs(root), 120,
                        "both jobs")
        assert node.scp.port and synthesis.pid not in (None, victim)  # a new process
        assert b"vcemri_synthesis_process_crashes_total 1.0" in node.metrics.exposition()
    assert [j["state"] for j in done] == ["done", "done"], [j["reason"] for j in done]
    running.tps.assert_each_once(o["sop_instance_uid"]
                                 for o in query(root, "SELECT sop_instance_uid FROM outputs"))
    first = min(j["id"] for j in done)
    crash = [t for t in query(root, "SELECT * FROM transitions WHERE job_id = ?", first)
             if "synthesis process" in (t["reason"] or "")]
    assert len(crash) == 1 and crash[0]["state"] == "ready"
    assert f"(pid {victim}) was killed by SIGKILL" in crash[0]["reason"]
    assert "retrying in" in crash[0]["reason"]
    audited = [e for e in _audit(root) if e["event"] == "worker.crashed"]
    assert [e["job_id"] for e in audited] == [first]
    assert len(query(root, "SELECT * FROM instances")) == 32


def test_a_job_cancelled_mid_synthesis_ends_its_synthesis_process(cohort, tmp_path):
    """Cancelling a job while its study is being synthesized ends the child at once (it is
    held stopped here, so the synthesis cannot finish first): the job stays cancelled with no
    outputs, its partial output folder is gone, and the next study gets a fresh child."""
    with _synthesizing(cohort, tmp_path) as running:
        root, synthesis = running.root, running.synthesis
        child, job_id = synthesis.pid, synthesis.job_id
        os.kill(child, signal.SIGSTOP)
        cancel = subprocess.run([sys.executable, "-m", "vcemri", "--config", str(running.cfg),
                                 "jobs", "cancel", str(job_id)],
                                capture_output=True, text=True, timeout=60, check=False)
        assert cancel.returncode == 0, cancel.stderr
        wait_for(lambda: synthesis.job_id is None and (
            not Path(f"/proc/{child}").exists()
            or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]), 10,
            "the cancelled job's synthesis process to end")
        assert not dicom_node.output_folder(root, job_id).exists()
        assert storescu(_interleaved(cohort, 2), running.node.scp.port, called_ae="VCEMRI").ok
        done = wait_for(lambda: len(finished_jobs(root)) == 2 and finished_jobs(root), 120,
                        "the second job")
        assert synthesis.pid not in (None, child)
    states = {j["id"]: j["state"] for j in done}
    assert states[job_id] == "cancelled"
    assert [s for j, s in states.items() if j != job_id] == ["done"]
    assert not query(root, "SELECT * FROM outputs WHERE job_id = ?", job_id)
    assert len(running.tps.received()) == len(query(root, "SELECT * FROM outputs"))


# -- TLS ----------------------------------------------------------------------------------------


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    openssl = str(require("openssl"))  # skips, or fails in CI, when it is missing
    folder.mkdir()

    def run(*argv: str) -> None:
        subprocess.run([openssl, *argv], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=vcemri test CA")
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1"),
                            ("client", "extendedKeyUsage=clientAuth")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")
        (folder / f"{name}.ext").write_text(extension + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {p.stem + p.suffix: p for p in folder.iterdir()}


def test_tls_association_needs_a_trusted_client_certificate(cohort, tmp_path):
    certs = _certificates(tmp_path / "pki")
    cfg = write_config(tmp_path / "node.yaml", tmp_path / "root", cohort / "model.safetensors",
                       dicom={"tls": {"certificate": str(certs["server.pem"]),
                                      "private_key": str(certs["server.key"]),
                                      "ca_certificates": str(certs["ca.pem"]),
                                      "require_client_certificate": True}})
    node = start_node(cfg)
    t1, _ = _series(cohort)
    instances = [dicom_node.Output(str(pydicom.dcmread(f, stop_before_pixels=True)
                                       .SOPInstanceUID), f) for f in t1[:2]]
    trusted = config.Destination(ae_title="VCEMRI", host="127.0.0.1", port=node.scp.port,
                                 tls={"ca_certificates": certs["ca.pem"],
                                      "certificate": certs["client.pem"],
                                      "private_key": certs["client.key"]})
    anonymous = config.Destination(ae_title="VCEMRI", host="127.0.0.1", port=node.scp.port,
                                   tls={"ca_certificates": certs["ca.pem"]})
    plain = config.Destination(ae_title="VCEMRI", host="127.0.0.1", port=node.scp.port)
    timeouts = node.settings.dicom.timeouts
    untrusting = config.Destination(ae_title="VCEMRI", host="127.0.0.1", port=node.scp.port,
                                    tls={"ca_certificates": certs["client.pem"]})
    wrong_ae = config.Destination(ae_title="NOTVCEMRI", host="127.0.0.1", port=node.scp.port,
                                  tls={"ca_certificates": certs["ca.pem"],
                                       "certificate": certs["client.pem"],
                                       "private_key": certs["client.key"]})
    nobody = config.Destination(ae_title="VCEMRI", host="127.0.0.1", port=free_port())
    import socket

    silent = socket.create_connection(("127.0.0.1", node.scp.port))  # never says a word
    try:
        # the silent peer holds no one else up (the handshake is not in the accept loop)
        started = time.monotonic()
        assert dicom_node.send(instances, trusted, "node", calling_ae="MR",
                               timeouts=timeouts) == 2
        assert time.monotonic() - started < 5.0
        # Every failure names its cause (pynetdicom itself only logs it).
        expected = {
            "anonymous": (anonymous, "TLS"),
            "plain": (plain, "closed or aborted the association"),
            "untrusting": (untrusting, "TLS verification failed: "),
            "wrong_ae": (wrong_ae, "rejected the association: Called AE title not recognised"),
            "nobody": (nobody, "connection refused"),
        }
        for label, (peer, cause) in expected.items():
            with pytest.raises(config.PeerError) as failure:
                dicom_node.send(instances, peer, "node", calling_ae="MR", timeouts=timeouts)
            assert cause in str(failure.value), (label, str(failure.value))
            assert "unreachable or aborted" not in str(failure.value)
    finally:
        silent.close()
        node.stop()
    assert len(query(tmp_path / "root", "SELECT * FROM instances")) == 2
    # The node's side: refused handshakes are logged and audited with the reason.
    refused = [e for e in _audit(tmp_path / "root") if e["event"] == "association.refused"]
    assert len(refused) >= 2 and all(e["reason"].startswith("TLS handshake") for e in refused)
    assert any("CERTIFICATE" in e["reason"].upper() for e in refused)


# -- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 2 MiB file system: a tmpfs where this process may mount one; elsewhere (no
    privilege, a container) a folder on the ordinary disk whose spool gets ENOSPC once it
    holds 2 MiB (:class:`FullDisk`), so the test runs everywhere and never skips. Which one
    is printed (``pytest -rP`` shows it)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
            capture_output=True, text=True, check=False)
        refusal = done.stderr.strip() if done.returncode else ""
    except OSError as exc:  # no mount program at all
        refusal = str(exc)
    if not refusal:
        print(f"full disk: a 2 MiB tmpfs at {mountpoint}")
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        return
    print(f"full disk: cannot mount a tmpfs here ({refusal}); ENOSPC injected into the "
          "spool's fsync beyond 2 MiB instead")
    with FullDisk(mountpoint / "root" / "spool", capacity=2 * 2**20) as disk:
        yield mountpoint
    assert disk.refused, "the spool never fsynced a file: the full disk was not injected"


def test_a_full_disk_refuses_instances_with_out_of_resources(cohort, tmp_path, small_disk):
    root = small_disk / "root"
    cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors",
                       storage={"root": str(root), "min_free_mib": 0,
                                "audit_log": str(tmp_path / "audit.jsonl")})
    node = start_node(cfg)
    big = tmp_path / "big"
    big.mkdir()
    t1, _ = _series(cohort)
    for i in range(12):  # 12 instances of ~256 KiB: more than 2 MiB
        ds = pydicom.dcmread(t1[0])
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(i), "full-disk"])
        ds.Rows, ds.Columns = 256, 512
        ds.PixelData = os.urandom(256 * 512 * 2)
        ds.save_as(big / f"{i:02d}.dcm")
    try:
        storescu(sorted(big.iterdir()), node.scp.port, called_ae="VCEMRI",
                 extra_args=["--no-halt"])  # exits 0 whatever the statuses: see the audit
    finally:
        node.stop()
    refusals = [e for e in config.read_audit(tmp_path / "audit.jsonl")
                if e["event"] == "instance.refused"]
    assert refusals and all(e["status"] == "0xA700" for e in refusals)
    assert any("disk is full" in e["reason"] or "MiB free" in e["reason"] for e in refusals)
    assert not list((root / "spool").rglob(".*.tmp"))
    indexed = {r["path"] for r in query(root, "SELECT path FROM instances")}
    on_disk = {str(p) for p in (root / "spool").rglob("*.dcm")}
    assert indexed <= on_disk and len(indexed) + len(refusals) == 12


def test_a_write_failing_with_enospc_is_refused_cleanly_and_a_resend_succeeds(cohort, tmp_path):
    """A full disk on any machine (no mount, no privilege): every fsync of a spool file fails
    with ENOSPC while dcmtk storescu sends a series. The peer gets 0xA700 for each instance,
    nothing half-written is left, the audit log has each refusal with its reason, and once
    there is space again a resend is stored."""
    root = tmp_path / "root"
    cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors")
    t1, _ = _series(cohort)
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in t1}
    node = start_node(cfg)
    try:
        with FullDisk(root / "spool") as disk:
            refused = storescu(t1, node.scp.port, called_ae="VCEMRI",
                               extra_args=["--no-halt", "--verbose"])
        resent = storescu(t1, node.scp.port, called_ae="VCEMRI")
    finally:
        node.stop()
    # dcmtk names 0xA7xx statuses "Refused: OutOfResources"; --no-halt exits 0 whatever
    assert refused.output.count("Received Store Response (Refused: OutOfResources)") == 8, \
        refused.output
    assert len(disk.refused) == 8
    assert all(not p.exists() for p in disk.refused)  # the temporary files were removed
    audit = _audit(root)
    refusals = [e for e in audit if e["event"] == "instance.refused"]
    assert sorted(e["sop_instance_uid"] for e in refusals) == sorted(sent)
    assert all(e["status"] == "0xA700" and e["reason"] == "cannot write to the spool: the "
               "disk is full" for e in refusals)
    associations = [e for e in audit if e["event"] == "association.released"]
    assert [(e["count"], e.get("reason")) for e in associations] == [
        (0, "0 ignored, 8 refused"), (8, None)]
    assert resent.ok, resent.output
    spooled = {r["sop_instance_uid"]: Path(r["path"])
               for r in query(root, "SELECT * FROM instances")}
    assert spooled.keys() == sent.keys()
    for uid, original in sent.items():
        assert _dataset_bytes(spooled[uid]) == _dataset_bytes(original)
    on_disk = sorted(p for p in (root / "spool").rglob("*") if p.is_file())
    assert on_disk == sorted(spooled.values())  # nothing half-written from the first attempt


def test_jobs_command_lists_shows_retries_and_cancels(cohort, tmp_path):
    import sys as _sys

    node = _offline(cohort, tmp_path, assembly={"series_idle_s": 0.5, "study_timeout_s": 2.0})
    cfg, spool, queue, assembler = node.cfg, node.spool, node.queue, node.assembler
    (t1, t2), (other_t1, _) = _series(cohort), _series(cohort, 2)
    for f in t1 + t2 + other_t1:
        spool.store(f.read_bytes(), "MR")
    assembler.tick(time.time() + 1)
    assembler.tick(time.time() + 5)
    ready = next(j for j in queue.list() if j.state == "ready")
    failed = next(j for j in queue.list() if j.state == "failed")

    def vcemri(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_sys.executable, "-m", "vcemri", "--config", str(cfg), *argv],
                              capture_output=True, text=True, timeout=60, check=False)

    listing = vcemri("jobs", "list")
    assert listing.returncode == 0
    assert "T2w series not received within 2 s" in listing.stdout and "ready" in listing.stdout
    shown = json.loads(vcemri("jobs", "show", str(ready.id), "--json").stdout)
    assert shown["state"] == "ready" and shown["t2w_series_uid"]
    assert [t["state"] for t in shown["transitions"]] == ["ready"]
    refused = vcemri("jobs", "retry", str(failed.id))
    assert refused.returncode == 1 and "never had both a T1w and a T2w" in refused.stderr
    assert vcemri("jobs", "cancel", str(ready.id)).returncode == 0
    assert queue.get(ready.id).state == "cancelled"
    again = vcemri("jobs", "retry", str(ready.id))
    assert again.returncode == 0 and queue.get(ready.id).state == "ready"
    assert vcemri("jobs", "show", "999").returncode == 1


def test_spooled_files_whose_index_rows_were_lost_are_reindexed_at_start(cohort, tmp_path):
    root = tmp_path / "root"
    cfg = write_config(tmp_path / "node.yaml", root, cohort / "model.safetensors")
    settings = config.load_settings(cfg)
    t1, t2 = _series(cohort)
    spool = dicom_node.Spool(settings)
    for f in t1 + t2:
        assert spool.store(f.read_bytes(), "MR").status == 0
    lost = query(root, "SELECT sop_instance_uid FROM instances LIMIT 3")
    import sqlite3
    with sqlite3.connect(root / "node.sqlite") as db:  # as a power cut could leave it
        db.executemany("DELETE FROM instances WHERE sop_instance_uid = ?",
                       [(r["sop_instance_uid"],) for r in lost])
    assert len(query(root, "SELECT * FROM instances")) == 13
    assert dicom_node.Spool(settings).reconcile() == 0  # the constructor did it already
    assert len(query(root, "SELECT * FROM instances")) == 16


def test_review_regressions_content_in_flight_bad_headers_moved_uids_and_cancel(
        cohort, tmp_path):
    """Content completing while a job is in flight gets its own job afterwards; unreadable
    header values and UIDs moving between series are refused before anything is written; a
    job cancelled while running is not revived by its worker."""
    import numpy as np

    node = _offline(cohort, tmp_path, assembly={"series_idle_s": 0.5, "study_timeout_s": 60.0})
    root, spool, queue, assembler = node.root, node.spool, node.queue, node.assembler
    t1, t2 = _series(cohort)
    for f in t1 + t2:
        spool.store(f.read_bytes(), "MR")
    time.sleep(0.6)  # the series idle time: real time, as the node's own clock runs
    assembler.tick()
    first = queue.claim()
    assert first is not None and first.state == "running"
    changed = pydicom.dcmread(t1[0])
    pixels = changed.pixel_array.copy()
    pixels[0, 0] = np.uint16(pixels[0, 0]) + 1
    changed.PixelData = pixels.tobytes()
    buffer = tmp_path / "changed.dcm"
    changed.save_as(buffer)
    assert spool.store(buffer.read_bytes(), "MR").replaced
    # the running job still reads exactly the bytes it was created with
    assert sorted(f.read_bytes() for f in spool.files_of(first.inputs["t1w"])) == sorted(
        f.read_bytes() for f in t1)
    time.sleep(0.6)
    assembler.tick()
    assert len(queue.list()) == 1  # in flight: no second job yet
    queue.complete(first.id, "sending", "written", expected=("running",))
    queue.complete(first.id, "done", "delivered", expected=("sending",))
    assembler.tick()
    newest = queue.list()[0]
    assert newest.id != first.id and newest.state == "ready"
    assert newest.input_key != first.input_key

    bad = pydicom.dcmread(_series(cohort, 2)[0][0])
    bad.NumberOfFrames = 7
    bad.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    element = b"\x28\x00\x08\x00IS\x02\x007 "  # (0028,0008) IS "7 ", explicit VR LE
    encoded = (tmp_path / "bad.dcm").read_bytes()
    assert encoded.count(element) == 1
    refused = spool.store(encoded.replace(element, element[:-2] + b"ab"), "MR")
    assert refused.status == 0xC000 and "header value" in refused.reason
    assert not (root / "spool" / str(bad.StudyInstanceUID)).exists()

    moved = pydicom.dcmread(t2[0])
    moved.SeriesInstanceUID = pydicom.uid.generate_uid()
    moved.save_as(tmp_path / "moved.dcm")
    refused = spool.store((tmp_path / "moved.dcm").read_bytes(), "MR")
    assert refused.status == 0xA900 and "cannot move between series" in refused.reason

    running = queue.claim()
    assert running is not None and running.id == newest.id
    queue.cancel(running.id)
    with pytest.raises(dicom_node.JobChanged):
        queue.complete(running.id, "sending", "written", expected=("running",))
    assert queue.get(running.id).state == "cancelled"


def test_an_unreadable_optional_header_value_is_ignored_with_a_warning_never_stored(
        cohort, tmp_path):
    from pydicom import config as pydicom_config
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag
    from pynetdicom import AE

    cfg = write_config(tmp_path / "node.yaml", tmp_path / "root", cohort / "model.safetensors")
    node = start_node(cfg)
    t1, _ = _series(cohort, 2)
    odd = pydicom.dcmread(t1[0])
    counted = pydicom.dcmread(t1[1])
    previous = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        # raw elements: written as they are, as a careless scanner would
        for ds, tag, text in ((odd, 0x00180080, b"SIM^SECRETNAME"),
                              (counted, 0x00201002, b"notanumber")):
            ds._dict[Tag(tag)] = RawDataElement(Tag(tag), "DS" if tag == 0x00180080 else "IS",
                                                len(text), text, 0, False, True)
        ae = AE(ae_title="MR_SCANNER")
        ae.add_requested_context(odd.SOPClassUID, odd.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="VCEMRI")
        assert assoc.is_established
        statuses = [assoc.send_c_store(ds).Status for ds in (odd, counted)]
        assoc.release()
    finally:
        pydicom_config.settings.writing_validation_mode = previous
        node.stop()
    # Both handled one way: accepted, the odd value ignored, never kept as another type.
    assert statuses == [0x0000, 0x0000]
    [series] = query(tmp_path / "root", "SELECT * FROM series")
    header = json.loads(series["header"])
    assert header["RepetitionTime"] is None or isinstance(header["RepetitionTime"], float)
    warned = [e for e in _audit(tmp_path / "root") if e["event"] == "instance.header_ignored"]
    assert [w["sop_instance_uid"] for w in warned] == [str(odd.SOPInstanceUID),
                                                       str(counted.SOPInstanceUID)]
    assert warned[0]["reason"].startswith("RepetitionTime: not a number")
    assert warned[1]["reason"].startswith("ImagesInAcquisition: not a number")
    assert "SECRETNAME" not in (tmp_path / "root" / "audit.jsonl").read_text()


def test_idle_connections_and_giant_requests_cannot_block_the_port(cohort, tmp_path):
    """Idle TCP connections and a request announcing 1 GiB are closed before pynetdicom
    counts them; a host holding its share of connections (dicom.max_connections_per_address:
    idle ones, then real associations) has the next ones closed at once, while a scanner on
    another address is served at once (Linux routes all of 127/8 to loopback, so 127.0.0.2
    and .3 are other hosts here)."""
    import socket
    import struct

    from pynetdicom import AE

    def closed_by_node(connection: socket.socket) -> bool:
        connection.settimeout(5)
        try:
            return connection.recv(1) == b""
        except ConnectionResetError:  # closed with our bytes unread
            return True

    def echo(source: str) -> bool:
        ae = AE(ae_title="MR_SCANNER")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="VCEMRI",
                             bind_address=(source, 0))
        held.append(assoc)
        return assoc.is_established and assoc.send_c_echo().Status == 0x0000

    cfg = write_config(tmp_path / "node.yaml", tmp_path / "root", cohort / "model.safetensors",
                       dicom={"max_associations": 3, "max_connections_per_address": 2,
                              "timeouts": {"acse_s": 10, "dimse_s": 30, "network_s": 30,
                                           "first_pdu_s": 1.5}})
    node = start_node(cfg)
    idle = [socket.create_connection(("127.0.0.1", node.scp.port),
                                     source_address=(source, 0))
            for source in ("127.0.0.2",) * 3 + ("127.0.0.3",) * 3]
    giant = socket.create_connection(("127.0.0.1", node.scp.port))
    held: list = []
    try:
        # An A-ASSOCIATE-RQ announcing 1 GiB: closed before anything is read into memory.
        giant.sendall(b"\x01\x00" + struct.pack(">I", 2**30) + b"\x00" * 4096)
        assert closed_by_node(giant)
        # Beyond its share of 2, a host's connections are closed at once.
        assert closed_by_node(idle[2]) and closed_by_node(idle[5])
        # The 4 connections that never speak do not count against max_associations (3).
        started = time.monotonic()
        assert echo("127.0.0.1")
        assert time.monotonic() - started < 2.0
        held.pop().release()
        # ... and are closed after dicom.timeouts.first_pdu_s.
        assert all(closed_by_node(connection) for connection in idle[:2] + idle[3:5])
        # Real associations count too: a third one from 127.0.0.2 is closed, another host's
        # association still gets the last of the 3.
        assert echo("127.0.0.2") and echo("127.0.0.2")
        assert not echo("127.0.0.2")
        assert echo("127.0.0.1")
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        for connection in (*idle, giant):
            connection.close()
        node.stop()
    refused = [e["reason"] for e in _audit(tmp_path / "root")
               if e["event"] == "association.refused"]
    assert refused.count("no A-ASSOCIATE-RQ within 1.5 s (dicom.timeouts.first_pdu_s)") == 4
    assert refused.count("too many connections from 127.0.0.2 "
                         "(dicom.max_connections_per_address is 2)") == 2
    assert refused.count("too many connections from 127.0.0.3 "
                         "(dicom.max_connections_per_address is 2)") == 1
    assert any(f"type 0x01, {2**30} bytes" in r for r in refused)


def test_purge_deletes_old_finished_jobs_data_and_never_an_unfinished_jobs(cohort, tmp_path):
    import sys as _sys

    node = _offline(cohort, tmp_path, assembly={"series_idle_s": 0.5, "study_timeout_s": 60.0})
    cfg, spool, queue, assembler = node.cfg, node.spool, node.queue, node.assembler
    (t1, t2), (other_t1, other_t2) = _series(cohort), _series(cohort, 2)
    for f in t1 + t2 + other_t1 + other_t2:
        spool.store(f.read_bytes(), "MR")
    assembler.tick(time.time() + 1)
    old, current = sorted(queue.list(states=("ready",)), key=lambda j: j.id)
    queue.cancel(old.id)
    outputs = dicom_node.output_folder(tmp_path / "root", old.id)
    outputs.mkdir(parents=True)
    (outputs / "review.dcm").write_bytes(b"x" * 1000)
    time.sleep(1.2)

    def vcemri(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([_sys.executable, "-m", "vcemri", "--config", str(cfg), *argv],
                              capture_output=True, text=True, timeout=60, check=False)

    def spooled(job: dicom_node.Job) -> list[bool]:
        return [(tmp_path / "root" / "spool" / job.study_uid / series / f"{uid}.dcm").is_file()
                for series, role in ((job.t1w_series_uid, "t1w"), (job.t2w_series_uid, "t2w"))
                for uid, _ in job.inputs[role]]

    dry = vcemri("jobs", "purge", "--older-than", "0.00001", "--dry-run")  # 0.86 s
    assert dry.returncode == 0, dry.stderr
    count = sum(len(pairs) for pairs in old.inputs.values())
    assert dry.stdout.startswith(f"1 finished job(s) older than 0.00001 days: would delete "
                                 f"{count} spooled instances and 1 output files")
    assert all(spooled(old)) and outputs.is_dir()
    done = vcemri("jobs", "purge", "--older-than", "0.00001")
    assert done.returncode == 0, done.stderr
    assert f"deleted {count} spooled instances and 1 output files" in done.stdout
    assert not any(spooled(old)) and not outputs.exists()
    assert all(spooled(current)) and queue.get(current.id).state == "ready"
    kept = queue.get(old.id)
    assert kept.state == "cancelled" and kept.result["purged_at"] > 0  # history stays
    [audited] = [e for e in _audit(tmp_path / "root") if e["event"] == "job.purged"]
    assert audited["job_id"] == old.id and audited["count"] == count + 1
    again = vcemri("jobs", "purge", "--older-than", "0.00001")
    assert again.stdout.startswith("0 finished job(s)")
    # The same series sent again is a new series, with a job of its own.
    first = str(pydicom.dcmread(t1[0], stop_before_pixels=True).StudyInstanceUID)
    for f in (t1 + t2 if old.study_uid == first else other_t1 + other_t2):
        assert spool.store(f.read_bytes(), "MR").new


def test_a_free_space_target_purges_finished_jobs_oldest_first_and_never_an_unfinished_one(
        cohort, tmp_path):
    """storage.retention_free_mib's purge on a disk whose free space is its capacity less the
    files under the storage root: below the target it purges the least recently finished job
    first and stops once the target is met; a target no purge can meet purges every finished
    job and never the unfinished one. The CLI's dry run lists the same jobs."""
    import sys as _sys

    node = _offline(cohort, tmp_path, assembly={"series_idle_s": 0.5, "study_timeout_s": 60.0})
    root, spool, queue, assembler = node.root, node.spool, node.queue, node.assembler
    (a1, a2), (b1, b2) = _series(cohort), _series(cohort, 2)
    for f in a1 + a2 + b1 + b2:
        spool.store(f.read_bytes(), "MR")
    for f in a1 + a2:  # a third study: patient 1 under other UIDs
        ds = pydicom.dcmread(f)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(ds, keyword, generate_uid(entropy_srcs=["third", str(ds[keyword].value)]))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(tmp_path / "third.dcm", enforce_file_format=True)
        assert spool.store((tmp_path / "third.dcm").read_bytes(), "MR").new
    assembler.tick(time.time() + 1)
    first, second, unfinished = sorted(queue.list(states=("ready",)), key=lambda j: j.id)
    queue.cancel(first.id)
    time.sleep(0.05)
    queue.cancel(second.id)

    def used() -> int:
        return sum(p.stat().st_size for p in (root / "spool").rglob("*.dcm"))

    capacity = used() + 2**20  # 1 MiB free now
    def free_mib() -> float:
        return (capacity - used()) / 2**20

    inputs = {j.id: j.inputs for j in (first, second, unfinished)}
    size_first = spool.measure([u for pairs in inputs[first.id].values() for u, _ in pairs])[1]
    audit = config.AuditLog(root / "audit.jsonl")
    met = dicom_node.purge_for_space(queue, spool, 1 + size_first / 2 / 2**20,
                                     free_mib=free_mib, audit=audit)
    assert met.jobs == [first.id] and met.bytes == size_first
    assert met.free_after_mib == pytest.approx(1 + size_first / 2**20)
    assert queue.get(second.id).result.get("purged_at") is None
    unmet = dicom_node.purge_for_space(queue, spool, 10**6, free_mib=free_mib, audit=audit)
    assert unmet.jobs == [second.id] and unmet.free_after_mib < 10**6
    assert queue.get(unfinished.id).state == "ready"
    assert len(spool.files_of(unfinished.inputs["t1w"])) == len(a1)  # never touched
    purged = [e for e in _audit(root) if e["event"] == "job.purged"]
    assert [e["job_id"] for e in purged] == [first.id, second.id]
    assert "below storage.retention_free_mib" in purged[0]["reason"]
    dry = subprocess.run([_sys.executable, "-m", "vcemri", "--config", str(node.cfg), "jobs",
                          "purge", "--free-mib", "1e12", "--dry-run"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("0 finished job(s), oldest first, for 1e+12 MiB free")
    assert dry.stderr.startswith("free space stays below 1e+12 MiB: no finished job is left")


def test_serve_with_json_logs_writes_only_json_lines_and_says_how_it_stops(cohort, tmp_path):
    import signal

    from support.processes import port_open

    cfg = write_config(tmp_path / "node.yaml", tmp_path / "root", cohort / "model.safetensors")
    port = config.load_settings(cfg).dicom.port
    process = subprocess.Popen([sys.executable, "-m", "vcemri", "--log-format", "json",
                                "--config", str(cfg), "serve"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: port_open(port), 60, "vcemri serve")
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and out == ""
    lines = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    messages = [line["message"] for line in lines]
    assert any("listening on" in m for m in messages)
    assert "stopping: no new associations; no job is running" in messages
