"""The test fixtures later issues rely on: storescp, storescu, Orthanc and dciodvfy, proven
against each other with real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from support.dciodvfy import DciodvfyAbort, parse
from support.dcmtk import StoreSCP
from support.processes import port_open
from support.tools import dcmtk_tool, require


def _copies(source: Path, directory: Path, count: int) -> list[Path]:
    """``count`` copies of ``source`` with distinct SOP Instance UIDs."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        ds = pydicom.dcmread(source)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = directory / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


@pytest.mark.dcmtk
def test_dcmtk_tools_are_dcmtk_not_pynetdicom_apps():
    # pynetdicom installs Python scripts named storescp/storescu that shadow dcmtk's on PATH.
    for name in ("storescp", "storescu"):
        path = require(name)  # skips, or fails in CI, when dcmtk is missing
        assert path == dcmtk_tool(name)
        assert path.read_bytes()[:4] == b"\x7fELF", f"{path} is not the dcmtk binary"


@pytest.mark.dcmtk
def test_storescu_delivers_files_to_storescp_unchanged(tps, send, mr_file, tmp_path):
    files = _copies(mr_file, tmp_path / "out", 3)

    result = send(files, tps.port, called_ae=tps.ae_title)

    assert result.ok, result.output
    received = tps.received()
    assert len(received) == 3
    sent = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in files}
    for path in received:
        got = pydicom.dcmread(path)
        original = sent[got.SOPInstanceUID]
        assert got.SOPClassUID == pydicom.uid.MRImageStorage
        np.testing.assert_array_equal(got.pixel_array, original.pixel_array)


@pytest.mark.dcmtk
def test_storescp_stops_and_frees_its_port(tmp_path):
    server = StoreSCP(tmp_path / "tps")
    port = server.port
    assert port_open(port)

    server.stop()

    assert not server.process.running
    assert not port_open(port)


@pytest.mark.dcmtk
def test_storescu_reports_a_refusing_tps(tmp_path, send, mr_file):
    with StoreSCP(tmp_path / "tps", extra_args=["--refuse"]) as refusing:
        result = send([mr_file], refusing.port, called_ae=refusing.ae_title)
        assert not result.ok
        assert refusing.received() == []


@pytest.mark.dcmtk
def test_storescu_fails_when_nothing_listens(send, mr_file):
    from support.processes import free_port

    result = send([mr_file], free_port(), called_ae="TPS", timeout=30)
    assert not result.ok


@pytest.mark.dcmtk
@pytest.mark.orthanc
def test_orthanc_receives_over_dicom_and_answers_over_rest(orthanc, send, mr_file, tmp_path):
    files = _copies(mr_file, tmp_path / "out", 2)

    result = send(files, orthanc.dicom_port, called_ae=orthanc.ae_title)

    assert result.ok, result.output
    stored = {orthanc.tags(i)["SOPInstanceUID"] for i in orthanc.instances()}
    assert stored == {pydicom.dcmread(f).SOPInstanceUID for f in files}
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    found = orthanc.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study}})
    assert len(found) == 1
    series = orthanc.get(f"/studies/{found[0]}/series")
    assert [len(s["Instances"]) for s in series] == [2]


@pytest.mark.orthanc
@pytest.mark.dcmtk
def test_orthanc_checks_the_called_ae_title(orthanc, send, mr_file):
    result = send([mr_file], orthanc.dicom_port, called_ae="NOT_ORTHANC")
    assert not result.ok
    assert orthanc.instances() == []


@pytest.mark.orthanc
def test_orthanc_stops_and_frees_its_ports(tmp_path):
    from support.orthanc import Orthanc

    server = Orthanc(tmp_path / "pacs")
    ports = (server.dicom_port, server.http_port)
    assert server.upload(Path(pydicom.data.get_testdata_file("MR_small.dcm")))["Status"] == "Success"

    server.stop()

    assert not server.process.running
    assert not any(port_open(p) for p in ports)


@pytest.mark.dciodvfy
def test_dciodvfy_passes_a_valid_mr_file(dciodvfy, mr_file):
    report = dciodvfy(mr_file)
    assert report.iod == "MRImage"
    assert report.ok, report.errors
    assert report.returncode == 0


@pytest.mark.dciodvfy
def test_dciodvfy_flags_missing_type1_attributes(dciodvfy, mr_file, tmp_path):
    ds = pydicom.dcmread(mr_file)
    del ds.ImageType
    del ds.Rows
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)

    report = dciodvfy(broken)

    assert not report.ok
    assert any("<Rows>" in e and "Type 1" in e for e in report.errors)
    assert any("<ImageType>" in e for e in report.errors)


@pytest.mark.dciodvfy
def test_dciodvfy_flags_a_file_that_is_not_dicom(dciodvfy, tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not a DICOM file\n" * 10)
    report = dciodvfy(junk)
    assert not report.ok


@pytest.mark.dciodvfy
def test_dciodvfy_abort_is_an_exception(dciodvfy, tmp_path):
    with pytest.raises(DciodvfyAbort, match="File open for read failed"):
        dciodvfy(tmp_path / "missing.dcm")


def test_dciodvfy_output_parsing():
    output = (
        "Warning - Value dubious for this VR - (0x0008,0x1070) PN Operators' Name\n"
        "MRImage\n"
        "Error - Missing attribute Type 1 Required Element=<Rows> Module=<ImagePixel>\n"
        "(0x6167,0x6272)  ?  - Error - Bad Value Length - not a multiple of 2\n"
    )
    report = parse(Path("x.dcm"), output, 1)
    assert report.iod == "MRImage"
    assert report.errors == [
        "Missing attribute Type 1 Required Element=<Rows> Module=<ImagePixel>",
        "(0x6167,0x6272)  ? Bad Value Length - not a multiple of 2",
    ]
    assert len(report.warnings) == 1
    assert not report.ok
