"""What every written object shares: deterministic UIDs, copied patient/study identity,
our equipment, and the synthetic-data labelling."""

from __future__ import annotations

import datetime as _dt
from importlib import metadata

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

MANUFACTURER = "vcemri"

#: Copied from the source T1w into every object, so they join the same patient and study.
PATIENT_STUDY = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "PatientAge", "PatientWeight", "StudyInstanceUID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
)


def software_version() -> str:
    try:
        return metadata.version("vcemri")
    except metadata.PackageNotFoundError:
        return "unknown"


def derived_uid(key: str, *parts: object) -> str:
    """A UID that depends only on the inputs and the model (``key``) and ``parts``: processing
    the same study with the same model again gives the same UIDs, never a second series."""
    return generate_uid(entropy_srcs=["vcemri-planning", key, *map(str, parts)])


def copy_patient_study(target: Dataset, source: Dataset) -> None:
    for keyword in PATIENT_STUDY:
        if keyword in source:
            setattr(target, keyword, source.data_element(keyword).value)
        elif keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                         "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                         "AccessionNumber"):
            setattr(target, keyword, "")  # type 2: present, empty
    target.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 100")


def now() -> tuple[str, str]:
    moment = _dt.datetime.now()
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")


def synthesizing_equipment(model: str) -> Dataset:
    """A ContributingEquipmentSequence item: vcemri as Synthesizing Equipment (DCM 109100)."""
    item = Dataset()
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = model[:64]
    item.SoftwareVersions = software_version()
    code = Dataset()
    code.CodeValue = codes.DCM.SynthesizingEquipment.value
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = codes.DCM.SynthesizingEquipment.meaning
    item.PurposeOfReferenceCodeSequence = [code]
    return item
