"""Writing a simulated patient as real DICOM: MR Image Storage series (T1w, T2w, CE-T1w), the
ground-truth tumour as DICOM SEG (highdicom) and NIfTI (SimpleITK).

Every UID is derived from the cohort seed, the institution and the patient, so the same seed
writes the same files. Simulated images say what they are: patient names SIM^..., an
institution name that starts with "Simulated", "(simulated)" in the study description and the
simulator in SoftwareVersions. (SyntheticData is not written: Debian's dciodvfy does not know
the attribute yet and reports it as an error.)
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from .acquisition import Geometry, Protocol
from .institutions import Institution, Role

SOFTWARE = "vcemri simulator"

#: Series numbers as a scanner would number a head-and-neck exam.
SERIES_NUMBERS: dict[Role, int] = {"t1w": 3, "t2w": 4, "ce": 7}

#: Gd-DOTA, 0.1 mmol/kg (seed 000 Table 1); 0.5 mmol/ml, 279.3 mg/ml gadoterate meglumine.
GD_MMOL_PER_KG = 0.1
GD_MMOL_PER_ML = 0.5


@dataclass(frozen=True)
class PatientInfo:
    """Patient- and study-level identity of a simulated patient (all simulated)."""

    patient_id: str
    patient_name: str
    sex: str
    age_years: int
    weight_kg: float
    study_uid: str
    frame_of_reference_uid: str
    study_datetime: _dt.datetime
    uid_seed: str  # entropy for every further UID of this patient

    def uid(self, *parts: object) -> str:
        """A UID derived from this patient and ``parts`` (deterministic)."""
        return derived_uid(self.uid_seed, *parts)


def derived_uid(seed: str, *parts: object) -> str:
    """A UID under pydicom's root derived from ``seed`` and ``parts`` (the same every time)."""
    return generate_uid(entropy_srcs=[seed, *map(str, parts)])


def quantise(volume: np.ndarray, institution: Institution) -> np.ndarray:
    """Scanner units -> stored pixel values (inverse of RescaleSlope/Intercept when the
    vendor writes them), rounded and clipped to the stored bit depth."""
    slope, intercept = institution.rescale or (1.0, 0.0)
    stored = np.rint((volume - intercept) / slope)
    bits = institution.bits_stored
    if institution.pixel_representation == 1:
        low, high, dtype = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, np.int16
    else:
        low, high, dtype = 0, 2**bits - 1, np.uint16
    return np.clip(stored, low, high).astype(dtype)


def _date(value: _dt.datetime) -> tuple[str, str]:
    return value.strftime("%Y%m%d"), value.strftime("%H%M%S")


def _base_dataset(info: PatientInfo, institution: Institution) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = info.sex
    ds.PatientAge = f"{info.age_years:03d}Y"
    ds.PatientWeight = round(info.weight_kg, 1)
    ds.StudyInstanceUID = info.study_uid
    ds.StudyDate, ds.StudyTime = _date(info.study_datetime)
    ds.ReferringPhysicianName = ""
    ds.StudyID = "SIM"
    ds.AccessionNumber = ""
    ds.StudyDescription = "HEAD NECK NPC (simulated)"
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = institution.manufacturer
    ds.ManufacturerModelName = institution.model
    ds.InstitutionName = institution.institution_name
    ds.StationName = institution.station_name
    ds.SoftwareVersions = SOFTWARE
    ds.DeviceSerialNumber = f"SIM{institution.key.upper()}"
    return ds


def series_datasets(
    volume: np.ndarray,
    geometry: Geometry,
    institution: Institution,
    role: Role,
    protocol: Protocol,
    info: PatientInfo,
) -> list[Dataset]:
    """One MR Image Storage dataset per slice, in the institution's instance order."""
    sequence = institution.sequence(role)
    stored = quantise(volume, institution)
    slope, intercept = institution.rescale or (1.0, 0.0)
    values = stored.astype(np.float64) * slope + intercept
    low, high = np.percentile(values[values > 0], [1.0, 99.5]) if (values > 0).any() else (0, 1)
    series_uid = info.uid("series", role)
    acquired = info.study_datetime + _dt.timedelta(minutes={"t1w": 5, "t2w": 10, "ce": 25}[role])
    date, time = _date(acquired)
    order = range(geometry.slices)
    if institution.slice_order == "descending":
        order = range(geometry.slices - 1, -1, -1)
    normal = geometry.normal
    datasets = []
    for number, k in enumerate(order, start=1):
        ds = _base_dataset(info, institution)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = info.uid("instance", role, k)
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = SERIES_NUMBERS[role]
        ds.SeriesDescription = sequence.description
        ds.ProtocolName = sequence.description
        ds.SeriesDate, ds.SeriesTime = date, time
        ds.AcquisitionDate, ds.AcquisitionTime = date, time
        ds.ContentDate, ds.ContentTime = date, time
        ds.BodyPartExamined = "HEADNECK"
        ds.PatientPosition = "HFS"
        ds.InstanceNumber = number
        ds.AcquisitionNumber = 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = sequence.scanning_sequence.split("\\")
        ds.SequenceVariant = sequence.sequence_variant.split("\\")
        ds.ScanOptions = ""
        ds.MRAcquisitionType = sequence.acquisition
        ds.SequenceName = sequence.sequence_name
        ds.RepetitionTime = round(protocol.tr_ms, 2)
        ds.EchoTime = round(protocol.te_ms, 2)
        ds.EchoTrainLength = sequence.echo_train_length
        if sequence.ti_ms is not None:
            ds.InversionTime = sequence.ti_ms
        ds.FlipAngle = sequence.flip_deg
        ds.MagneticFieldStrength = institution.field_t
        ds.ImagingFrequency = round(42.577478 * institution.field_t, 6)
        ds.ImagedNucleus = "1H"
        ds.NumberOfAverages = 1
        ds.SliceThickness = round(geometry.slice_thickness_mm, 4)
        ds.SpacingBetweenSlices = round(geometry.slice_spacing_mm, 4)
        ds.PixelSpacing = [round(geometry.row_spacing_mm, 6), round(geometry.column_spacing_mm, 6)]
        ds.ImageOrientationPatient = [round(v, 6) for v in geometry.orientation]
        position = geometry.positions[k]
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.SliceLocation = round(float(np.dot(position, normal)), 4)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = geometry.rows, geometry.columns
        ds.BitsAllocated = 16
        ds.BitsStored = institution.bits_stored
        ds.HighBit = institution.bits_stored - 1
        ds.PixelRepresentation = institution.pixel_representation
        if institution.rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = institution.rescale
            ds.RescaleType = "US"
        ds.WindowCenter = round(float((low + high) / 2), 2)
        ds.WindowWidth = round(float(max(high - low, 1.0)), 2)
        if role == "ce":
            volume_ml = info.weight_kg * GD_MMOL_PER_KG / GD_MMOL_PER_ML
            ds.ContrastBolusAgent = "Gd-DOTA (gadoterate meglumine) 0.1 mmol/kg"
            ds.ContrastBolusRoute = "IV"
            ds.ContrastBolusVolume = round(volume_ml, 1)
            ds.ContrastBolusTotalDose = round(volume_ml, 1)
            ds.ContrastBolusIngredient = "GADOLINIUM"
            ds.ContrastBolusIngredientConcentration = 279.3
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        datasets.append(ds)
    return datasets


def write_datasets(datasets: list[Dataset], directory: Path) -> list[Path]:
    """Write a series as ``0001.dcm``, ``0002.dcm``... (DICOM Part 10 files)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_mask_nifti(mask: np.ndarray, geometry: Geometry, path: Path) -> None:
    """The tumour mask (slices ascending along the normal) as NIfTI in patient space."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetOrigin([float(v) for v in geometry.positions[0]])
    image.SetSpacing([geometry.column_spacing_mm, geometry.row_spacing_mm,
                      geometry.slice_spacing_mm])
    axes = np.stack([geometry.row_direction, geometry.column_direction, geometry.normal], axis=1)
    image.SetDirection([float(v) for v in axes.ravel()])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def write_mask_seg(mask: np.ndarray, t1w: list[Dataset], info: PatientInfo,
                   institution: Institution, path: Path) -> None:
    """The ground-truth tumour as a binary DICOM SEG referencing the T1w series.

    ``mask`` is ascending along the normal; ``t1w`` in the institution's instance order.
    """
    ordered = sorted(t1w, key=lambda ds: float(np.dot(
        np.asarray(ds.ImagePositionPatient, float),
        np.cross(*np.reshape(np.asarray(ds.ImageOrientationPatient, float), (2, 3))))))
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="GTV-NPC (simulated ground truth)",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=SOFTWARE, version="1", family=codes.cid7162.ArtificialIntelligence
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=mask.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=info.uid("series", "seg"),
        series_number=90,
        sop_instance_uid=info.uid("instance", "seg"),
        instance_number=1,
        manufacturer="vcemri",
        manufacturer_model_name=SOFTWARE,
        software_versions="1",
        device_serial_number=f"SIM{institution.key.upper()}",
        series_description="GTV ground truth (simulated)",
    )
    # highdicom stamps the current time; the cohort's files must depend on its seed only.
    created = info.study_datetime + _dt.timedelta(hours=1)
    seg.InstanceCreationDate, seg.InstanceCreationTime = _date(created)
    seg.ContentDate, seg.ContentTime = _date(created)
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S")
    random_uid = seg.DimensionOrganizationSequence[0].DimensionOrganizationUID
    fixed_uid = info.uid("seg", "dimensions")

    def _fix(dataset: Dataset, element: pydicom.DataElement) -> None:
        if element.VR == "UI" and element.value == random_uid:
            element.value = fixed_uid

    seg.walk(_fix)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
