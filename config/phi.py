"""The PHI policy: what may appear in logs, audit records and error reasons.

Allowed: UIDs (study, series, instance, frame of reference, SOP class, transfer syntax), job
ids, AE titles, peer addresses, model names, counts, states, durations, and paths chosen by the
administrator. Never: patient names, patient IDs, birth dates, accession numbers, addresses,
physicians' and operators' names, free-text comments, or whole datasets.

Three mechanisms enforce it:
- :data:`ALLOWED_FIELDS` is the closed vocabulary of structured fields; the audit log refuses any
  other field, and UID fields must look like UIDs (so a name cannot be smuggled into one);
- :class:`PHIFilter` redacts pydicom person names, datasets and elements passed as log
  arguments, and any ``extra`` field named after a PHI attribute;
- :func:`loggable_identifiers` is the one way to take identifiers from a dataset for logging.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

#: DICOM keywords whose values identify a patient or a person (PS3.15 Annex E, abridged to
#: what an MR series carries). Never logged, never audited.
PHI_KEYWORDS = frozenset(
    {
        "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientBirthName",
        "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames", "IssuerOfPatientID",
        "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
        "MedicalRecordLocator", "PatientComments", "AccessionNumber", "StudyID",
        "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
        "NameOfPhysiciansReadingStudy", "RequestingPhysician", "PhysiciansOfRecord",
        "InstitutionAddress", "MilitaryRank", "BranchOfService", "PatientInsurancePlanCodeSequence",
        "ResponsiblePerson", "RequestAttributesSequence", "ImageComments", "StudyDescription",
    }
)

#: Structured fields that logs and the audit log may carry (the PHI policy's allow-list).
ALLOWED_FIELDS = frozenset(
    {
        "job_id", "association_id", "study_uid", "series_uid", "sop_instance_uid",
        "sop_class_uid", "frame_of_reference_uid", "transfer_syntax_uid", "calling_ae",
        "called_ae", "peer_host", "peer_port", "listen_port", "destination", "route", "role",
        "model", "model_version", "institution", "state", "previous_state", "status", "attempt",
        "count", "bytes", "duration_s", "path", "command", "user", "worker",
    }
)

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

#: Dataset attributes :func:`loggable_identifiers` takes, and the field names it gives them.
_IDENTIFIERS = {
    "StudyInstanceUID": "study_uid",
    "SeriesInstanceUID": "series_uid",
    "SOPInstanceUID": "sop_instance_uid",
    "SOPClassUID": "sop_class_uid",
    "FrameOfReferenceUID": "frame_of_reference_uid",
}

REDACTED = "<redacted>"


def is_uid(value: str) -> bool:
    """Whether ``value`` is a syntactically valid DICOM UID (PS3.5 9.1)."""
    return len(value) <= 64 and bool(_UID.match(value))


def check_field(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``name=value`` may be logged under the PHI policy."""
    if name not in ALLOWED_FIELDS:
        raise ValueError(f"field {name!r} is not allowed by the PHI policy (config.phi)")
    if value is None:
        return
    if not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"field {name!r} must be a plain value, not {type(value).__name__}")
    if name.endswith("_uid") and not (isinstance(value, str) and is_uid(value)):
        raise ValueError(f"field {name!r} must be a DICOM UID, got a {type(value).__name__}")


def loggable_identifiers(dataset: Any) -> dict[str, str]:
    """The UIDs of a pydicom dataset that may be logged, as structured fields."""
    out = {}
    for keyword, field in _IDENTIFIERS.items():
        value = str(getattr(dataset, keyword, "") or "")
        if value and is_uid(value):
            out[field] = value
    return out


def _is_phi_object(value: Any) -> bool:
    module = type(value).__module__ or ""
    return module.startswith("pydicom") and type(value).__name__ in {
        "PersonName", "Dataset", "FileDataset", "DataElement", "RawDataElement", "Sequence",
    }


def _redact(value: Any) -> Any:
    return REDACTED if _is_phi_object(value) else value


def _snake(keyword: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", keyword).lower()


_PHI_EXTRA_NAMES = frozenset(PHI_KEYWORDS | {_snake(k) for k in PHI_KEYWORDS})


class PHIFilter(logging.Filter):
    """Redacts PHI from log records before any handler formats them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, Mapping):
            record.args = {k: _redact(v) for k, v in record.args.items()}
        elif isinstance(record.args, tuple):
            record.args = tuple(_redact(a) for a in record.args)
        if _is_phi_object(record.msg):
            record.msg = REDACTED
        for name in _PHI_EXTRA_NAMES.intersection(record.__dict__):
            setattr(record, name, REDACTED)
        return True
