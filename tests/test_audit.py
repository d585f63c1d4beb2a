"""The append-only audit log: complete records, a hash chain that shows tampering, the PHI
policy enforced, safe under concurrent writers, nothing torn on a failed write."""

from __future__ import annotations

import json
import multiprocessing
import threading

import pytest

from config import AuditLog, StorageError, read_audit, verify_audit

STUDY = "1.2.826.0.1.3680043.8.498.1"


def test_records_are_json_lines_with_sequence_time_and_fields(tmp_path):
    log = AuditLog(tmp_path / "audit" / "audit.jsonl")
    log.record("association.accepted", calling_ae="MR1", called_ae="VCEMRI", peer_host="127.0.0.1")
    log.record("job.failed", outcome="failure", reason="T2w series not received within 600 s",
               job_id="j-1", study_uid=STUDY)

    records = list(read_audit(log.path))

    assert [r["seq"] for r in records] == [1, 2]
    assert records[0]["event"] == "association.accepted"
    assert records[0]["outcome"] == "success"
    assert records[1]["reason"] == "T2w series not received within 600 s"
    assert records[1]["study_uid"] == STUDY
    assert records[1]["ts"].endswith("+00:00")
    assert (log.path.stat().st_mode & 0o777) == 0o600
    assert verify_audit(log.path).ok


def test_appending_keeps_earlier_lines_byte_for_byte(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.record("job.created", job_id="a")
    before = log.path.read_bytes()
    AuditLog(log.path).record("job.done", job_id="a")  # a new writer, as after a restart
    after = log.path.read_bytes()
    assert after.startswith(before)
    assert [r["seq"] for r in read_audit(log.path)] == [1, 2]


def test_editing_a_line_breaks_the_chain(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(4):
        log.record("instance.stored", count=i)
    lines = log.path.read_text().splitlines()
    lines[1] = lines[1].replace('"count":1', '"count":9')
    log.path.write_text("\n".join(lines) + "\n")

    result = verify_audit(log.path)

    assert not result.ok
    assert result.broken_line == 3
    assert "hash chain broken" in (result.problem or "")


def test_deleting_a_line_breaks_the_chain(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(3):
        log.record("instance.stored", count=i)
    lines = log.path.read_text().splitlines()
    log.path.write_text(lines[0] + "\n" + lines[2] + "\n")
    assert verify_audit(log.path).broken_line == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"patient_name": "DOE^JANE"}, "not allowed by the PHI policy"),
     ({"PatientID": "12345"}, "not allowed by the PHI policy"),
     ({"study_uid": "DOE^JANE"}, "must be a DICOM UID"),
     ({"job_id": {"nested": 1}}, "plain value")],
)
def test_phi_policy_is_enforced_before_writing(tmp_path, fields, message):
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ValueError, match=message):
        log.record("instance.stored", **fields)
    assert not log.path.exists()


def test_event_names_and_outcomes_are_checked(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(ValueError):
        log.record("Stored")
    with pytest.raises(ValueError):
        log.record("job.done", outcome="maybe")  # type: ignore[arg-type]


def test_concurrent_threads_never_interleave(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", fsync=False)

    def write(worker: int) -> None:
        for i in range(50):
            log.record("instance.stored", count=i, association_id=f"t{worker}")

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    result = verify_audit(log.path)
    assert result.ok and result.records == 200


def _write_from_process(path: str, worker: int) -> None:
    log = AuditLog(path, fsync=False)
    for i in range(40):
        log.record("instance.stored", count=i, association_id=f"p{worker}")


def test_concurrent_processes_never_interleave(tmp_path):
    path = str(tmp_path / "audit.jsonl")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_from_process, args=(path, w)) for w in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0

    result = verify_audit(path)
    assert result.ok and result.records == 80


def test_a_failed_write_leaves_no_torn_line_and_says_why(tmp_path, monkeypatch):
    from config import audit

    log = AuditLog(tmp_path / "audit.jsonl")
    log.record("job.created", job_id="a")
    real_write = audit.os.write
    monkeypatch.setattr(audit.os, "write", lambda fd, data: real_write(fd, data[:10]))

    with pytest.raises(StorageError, match="cannot write the audit log"):
        log.record("job.done", job_id="a")

    monkeypatch.setattr(audit.os, "write", real_write)
    assert len(log.path.read_text().splitlines()) == 1
    log.record("job.done", job_id="a")
    assert verify_audit(log.path).ok


def test_a_damaged_last_line_is_refused_with_a_reason(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text(json.dumps({"seq": 1}) + "\n{\"seq\": 2, \"ev")
    with pytest.raises(StorageError, match="last line of the audit log .* is damaged"):
        AuditLog(path).record("job.created", job_id="a")
