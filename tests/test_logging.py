"""Console logging in both formats, and the PHI policy applied to it."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pydicom
import pytest
from pydicom.valuerep import PersonName

from config import loggable_identifiers, setup_logging
from config.phi import REDACTED

UID = "1.2.826.0.1.3680043.8.498.7"


@pytest.fixture
def console():
    stream = io.StringIO()
    yield stream
    setup_logging("human", "WARNING", stream=io.StringIO())


def test_json_lines_carry_message_level_and_allowed_fields(console):
    setup_logging("json", "INFO", stream=console)
    logging.getLogger("dicom_node.scp").info(
        "series complete", extra={"series_uid": UID, "count": 3, "secret_thing": "x"}
    )
    entry = json.loads(console.getvalue().splitlines()[-1])
    assert entry["message"] == "series complete"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "dicom_node.scp"
    assert entry["series_uid"] == UID and entry["count"] == 3
    assert "secret_thing" not in entry
    assert entry["ts"].endswith("Z")


def test_human_lines_show_fields(console):
    setup_logging("human", "INFO", stream=console)
    logging.getLogger("synthesis").warning("slow", extra={"job_id": "j-7"})
    line = console.getvalue().splitlines()[-1]
    assert "WARNING" in line and "synthesis: slow [job_id=j-7]" in line


def test_level_filters(console):
    setup_logging("human", "WARNING", stream=console)
    logging.getLogger("x").info("hidden")
    assert console.getvalue() == ""


def test_person_names_and_datasets_are_redacted(console, mr_file):
    setup_logging("json", "INFO", stream=console)
    ds = pydicom.dcmread(mr_file)
    log = logging.getLogger("dicom_node")
    log.info("received %s from %s", PersonName("DOE^JANE"), ds)
    log.info("patient", extra={"patient_name": "DOE^JANE", "PatientID": "123"})
    text = console.getvalue()
    assert "DOE" not in text and "123" not in text
    assert json.loads(text.splitlines()[0])["message"] == f"received {REDACTED} from {REDACTED}"


def test_loggable_identifiers_take_only_uids(mr_file):
    ds = pydicom.dcmread(mr_file)
    fields = loggable_identifiers(ds)
    assert set(fields) == {"study_uid", "series_uid", "sop_instance_uid", "sop_class_uid",
                           "frame_of_reference_uid"} & set(fields)
    assert fields["sop_instance_uid"] == ds.SOPInstanceUID
    assert str(ds.PatientName) not in json.dumps(fields)


def test_setup_is_idempotent(console):
    setup_logging("human", "INFO", stream=console)
    setup_logging("human", "INFO", stream=console)
    logging.getLogger("x").warning("once")
    assert console.getvalue().count("once") == 1


def test_pynetdicom_does_not_repeat_a_failed_association_we_report_ourselves():
    from support.processes import free_port

    import config
    import dicom_node

    nobody = config.Destination(ae_title="TPS", host="127.0.0.1", port=free_port())
    timeouts = config.Settings().dicom.timeouts
    lines = {}
    for level in ("INFO", "DEBUG"):
        stream = io.StringIO()
        config.setup_logging("human", level, stream=stream)
        try:
            with pytest.raises(config.PeerError, match="connection refused"):
                dicom_node.send([dicom_node.Output("1.2.3", Path("x.dcm"), "1.2.840.10008.5.1.4."
                                                   "1.1.4", "1.2.840.10008.1.2.1")], nobody,
                                "tps", calling_ae="VCEMRI", timeouts=timeouts)
        finally:
            config.setup_logging("human", "INFO")
        lines[level] = stream.getvalue()
    assert "ERROR" not in lines["INFO"] and "Association request failed" not in lines["INFO"]
    assert "Association request failed" in lines["DEBUG"]  # still there when debugging
