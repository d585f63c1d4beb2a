"""The one layer that writes DICOM objects, for ``planning`` (the synthetic series, RTSTRUCT,
review image) and ``simulation`` (simulated scanners) alike.

- :func:`derived_uid`: UIDs derived from a seed and parts, so the same inputs give the same
  objects again (a TPS never holds two versions under one UID; a cohort seed writes the same
  bytes);
- :class:`MRImage`: one MR Image Storage instance (PS3.3 A.4) on highdicom's ``SOPClass``
  (file meta, SOP Common, patient, study, series and equipment), with the Image Plane, Image
  Pixel and MR Image modules and, for anything computed rather than acquired, SyntheticData
  YES and the Synthesizing Equipment (highdicom's ``ContributingEquipment``), and for an image
  computed from others a derived ImageType, DerivationDescription, a coded derivation and the
  source images;
- :class:`PixelStorage`: scanner units to stored integers and back (RescaleSlope/Intercept,
  bit depth, sign);
- :func:`write_object`, :func:`write_series`: DICOM Part 10 files, returning what was written
  (:class:`WrittenObject`: UIDs, SOP class, transfer syntax, path) so that callers never read
  back a file they have just written.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

#: Manufacturer of every object vcemri computes (synthetic series, helpers, review image).
MANUFACTURER = "vcemri"

#: Purpose of reference of a derived image's sources (DCM 121322).
SOURCE_PURPOSE = hd.sr.CodedConcept("121322", "DCM",
                                    "Source image for image processing operation")
#: How a synthetic image was derived: by an artificial-intelligence model (DCM 123110).
ARTIFICIAL_INTELLIGENCE = hd.sr.CodedConcept.from_code(codes.DCM.ArtificialIntelligence)

#: MR Image module attributes of type 1 or 2 (PS3.3 C.8.3.1) and the value written when the
#: caller has none: type 2 attributes are present and empty, ScanningSequence says RM
#: (research mode) and SequenceVariant NONE.
MR_IMAGE_REQUIRED: dict[str, Any] = {
    "ScanningSequence": "RM", "SequenceVariant": "NONE", "ScanOptions": "",
    "MRAcquisitionType": "", "EchoTime": "", "EchoTrainLength": "", "SliceThickness": "",
}


def software_version() -> str:
    """The installed vcemri version (``unknown`` from a source tree)."""
    try:
        return metadata.version("vcemri")
    except metadata.PackageNotFoundError:
        return "unknown"


def derived_uid(seed: str, *parts: object) -> str:
    """A UID under pydicom's root that depends only on ``seed`` and ``parts``."""
    return generate_uid(entropy_srcs=[seed, *map(str, parts)])


def synthesizing_equipment(model_name: str) -> hd.ContributingEquipment:
    """A Contributing Equipment item naming ``model_name`` as Synthesizing Equipment
    (DCM 109100), the purpose PS3.3 C.7.5.1 gives for equipment that made synthetic data."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.SynthesizingEquipment,
        manufacturer_model_name=model_name[:64],
        software_versions=software_version(),
    )


def display_window(values: np.ndarray) -> tuple[float, float]:
    """(WindowCenter, WindowWidth) spanning the 1st to 99.5th percentile of the positive
    values (scanner units), as a viewer's automatic window would."""
    positive = np.asarray(values)[np.asarray(values) > 0]
    low, high = np.percentile(positive, [1.0, 99.5]) if positive.size else (0.0, 1.0)
    return round(float((low + high) / 2), 2), round(float(max(high - low, 1.0)), 2)


@dataclass(frozen=True)
class ImagePlane:
    """The Image Plane module of one slice (PS3.3 C.7.6.2), patient LPS coordinates in mm."""

    #: ImagePositionPatient: the centre of the first transmitted pixel
    position_mm: tuple[float, float, float]
    #: ImageOrientationPatient: direction cosines of a row, then of a column
    orientation: tuple[float, float, float, float, float, float]
    #: PixelSpacing: (between rows, between columns)
    pixel_spacing_mm: tuple[float, float]
    slice_thickness_mm: float | None = None
    spacing_between_slices_mm: float | None = None

    @property
    def normal(self) -> np.ndarray:
        """The slice normal (row direction x column direction)."""
        cosines = np.asarray(self.orientation, float)
        return np.cross(cosines[:3], cosines[3:])

    @property
    def slice_location_mm(self) -> float:
        """SliceLocation: the position along the normal."""
        return float(np.dot(np.asarray(self.position_mm, float), self.normal))


@dataclass(frozen=True)
class PixelStorage:
    """How scanner units become stored pixel values: ``rescale`` (RescaleSlope, Intercept) is
    written when not None (the Modality LUT), values are rounded and clipped to ``bits_stored``
    bits, signed (PixelRepresentation 1) or not."""

    bits_stored: int = 16
    signed: bool = False
    rescale: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.bits_stored <= 16:
            raise ValueError(f"bits stored must be 1-16, not {self.bits_stored}")
        if self.rescale is not None and self.rescale[0] == 0:
            raise ValueError("a RescaleSlope of 0 maps every pixel to one value")

    @property
    def limits(self) -> tuple[int, int]:
        """The smallest and largest stored value."""
        if self.signed:
            return -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        return 0, 2**self.bits_stored - 1

    def store(self, values: np.ndarray) -> np.ndarray:
        """Scanner units -> stored integers (int16 or uint16)."""
        slope, intercept = self.rescale or (1.0, 0.0)
        low, high = self.limits
        stored = np.clip(np.rint((np.asarray(values, np.float64) - intercept) / slope), low, high)
        return stored.astype(np.int16 if self.signed else np.uint16)

    def values(self, stored: np.ndarray) -> np.ndarray:
        """Stored integers -> scanner units (what a reader's Modality LUT gives)."""
        slope, intercept = self.rescale or (1.0, 0.0)
        return np.asarray(stored, np.float64) * slope + intercept


@dataclass(frozen=True)
class SourceImage:
    """An image (and frame) a derived image was computed from."""

    sop_class_uid: str
    sop_instance_uid: str
    frame: int | None = None

    def item(self) -> Dataset:
        """A Source Image Sequence item (PS3.3 C.7.6.1.1.4) with its purpose of reference."""
        item = Dataset()
        item.ReferencedSOPClassUID = self.sop_class_uid
        item.ReferencedSOPInstanceUID = self.sop_instance_uid
        if self.frame is not None:
            item.ReferencedFrameNumber = self.frame
        item.PurposeOfReferenceCodeSequence = [SOURCE_PURPOSE]
        return item


@dataclass(frozen=True)
class Derivation:
    """How a derived image was computed (PS3.3 C.7.6.1): DerivationDescription, the coded
    derivation and the source images."""

    description: str
    code: hd.sr.CodedConcept = ARTIFICIAL_INTELLIGENCE
    sources: tuple[SourceImage, ...] = ()


@dataclass(frozen=True)
class Synthetic:
    """What labels an image as made artificially rather than acquired: SyntheticData YES and
    the Synthesizing Equipment; with a ``derivation`` (computed from other images) also
    ImageType DERIVED\\SECONDARY and the derivation attributes. A simulated acquisition has
    none: it imitates an original image of a scanner that does not exist."""

    equipment: hd.ContributingEquipment
    derivation: Derivation | None = None


def _date_time(moment: _dt.datetime) -> tuple[str, str]:
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")


class MRImage(hd.SOPClass):
    """One MR Image Storage instance: a 2D slice with its plane, stored pixels and MR
    acquisition attributes (see the module docstring).

    ``attributes`` holds further attributes by DICOM keyword (MR Image, Contrast/Bolus, General
    Series, Patient Study ... : ScanningSequence, RepetitionTime, ContrastBolusAgent,
    PatientAge ...); the MR Image module's type 1 and 2 attributes missing from it get
    :data:`MR_IMAGE_REQUIRED`'s values. ``created`` sets the
    series, content and instance creation date and time (default: now), so that a simulated
    cohort's bytes depend on its seed only. ``synthetic`` labels the image synthetic; without it
    the image claims to be an original acquisition."""

    def __init__(
        self,
        *,
        pixels: np.ndarray,
        plane: ImagePlane,
        storage: PixelStorage,
        study_instance_uid: str,
        series_instance_uid: str,
        series_number: int,
        sop_instance_uid: str,
        instance_number: int,
        frame_of_reference_uid: str,
        manufacturer: str,
        series_description: str = "",
        attributes: Mapping[str, Any] | None = None,
        synthetic: Synthetic | None = None,
        window: tuple[float, float] | None = None,
        created: _dt.datetime | None = None,
        burned_in_annotation: bool = False,
        position_reference_indicator: str = "",
        station_name: str | None = None,
        specific_character_set: str = "ISO_IR 100",
        **identity: Any,
    ) -> None:
        pixels = np.asarray(pixels)
        if pixels.ndim != 2 or pixels.dtype not in (np.uint16, np.int16):
            raise ValueError(f"an MR slice is a 2D uint16/int16 array, not {pixels.dtype} "
                             f"{pixels.shape}")
        if (pixels.dtype == np.int16) != storage.signed:
            raise ValueError("the pixels' sign differs from the storage's PixelRepresentation")
        moment = created or _dt.datetime.now()
        date, time = _date_time(moment)
        super().__init__(
            study_instance_uid=study_instance_uid, series_instance_uid=series_instance_uid,
            series_number=series_number, sop_instance_uid=sop_instance_uid,
            sop_class_uid=MRImageStorage, instance_number=instance_number, modality="MR",
            manufacturer=manufacturer, transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=series_description[:64] or None, content_date=date,
            content_time=time, series_date=date, series_time=time,
            specific_character_set=specific_character_set, **identity)
        self.InstanceCreationDate, self.InstanceCreationTime = date, time
        if station_name is not None:
            self.StationName = station_name
        self.FrameOfReferenceUID = frame_of_reference_uid
        self.PositionReferenceIndicator = position_reference_indicator
        derivation = synthetic.derivation if synthetic is not None else None
        self.ImageType = (["DERIVED", "SECONDARY", "OTHER"] if derivation is not None
                          else ["ORIGINAL", "PRIMARY", "OTHER"])
        if synthetic is not None:
            self.SyntheticData = "YES"
            self.ContributingEquipmentSequence = [synthetic.equipment]
        if derivation is not None:
            self.DerivationDescription = derivation.description[:1024]
            self.DerivationCodeSequence = [derivation.code]
            if derivation.sources:
                self.SourceImageSequence = [source.item() for source in derivation.sources]
        for keyword, value in (attributes or {}).items():
            setattr(self, keyword, value)
        for keyword, default in MR_IMAGE_REQUIRED.items():
            if keyword not in self:
                setattr(self, keyword, default)
        self.ImagePositionPatient = [round(float(v), 4) for v in plane.position_mm]
        self.ImageOrientationPatient = [round(float(v), 6) for v in plane.orientation]
        self.PixelSpacing = [round(float(v), 6) for v in plane.pixel_spacing_mm]
        if plane.slice_thickness_mm is not None:
            self.SliceThickness = round(float(plane.slice_thickness_mm), 4)
        if plane.spacing_between_slices_mm is not None:
            self.SpacingBetweenSlices = round(float(plane.spacing_between_slices_mm), 4)
        self.SliceLocation = round(plane.slice_location_mm, 4)
        self.SamplesPerPixel = 1
        self.PhotometricInterpretation = "MONOCHROME2"
        self.Rows, self.Columns = (int(n) for n in pixels.shape)
        self.BitsAllocated = 16
        self.BitsStored = storage.bits_stored
        self.HighBit = storage.bits_stored - 1
        self.PixelRepresentation = int(storage.signed)
        if storage.rescale is not None:
            self.RescaleSlope = f"{storage.rescale[0]:.10g}"
            self.RescaleIntercept = f"{storage.rescale[1]:.10g}"
            self.RescaleType = "US"
        if window is not None:
            self.WindowCenter, self.WindowWidth = window
        self.BurnedInAnnotation = "YES" if burned_in_annotation else "NO"
        self.PixelData = np.ascontiguousarray(pixels).tobytes()

    @classmethod
    def from_ref_dataset(cls, ref_dataset: Dataset, **kwargs: Any) -> MRImage:
        """An image in the patient and study of ``ref_dataset`` (e.g. the T1w it was computed
        from): highdicom's ``copy_patient_and_study_information`` copies the Patient, General
        Study and Patient Study modules, and the character set comes along."""
        kwargs.setdefault("specific_character_set",
                          ref_dataset.get("SpecificCharacterSet", "ISO_IR 100"))
        image = cls(study_instance_uid=str(ref_dataset.StudyInstanceUID), **kwargs)
        image.copy_patient_and_study_information(ref_dataset)
        return image


@dataclass(frozen=True)
class WrittenObject:
    """One DICOM file written: what a sender and a job record need, without reading it back."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    series_instance_uid: str
    modality: str
    path: Path


def write_object(dataset: Dataset, path: Path) -> WrittenObject:
    """Write ``dataset`` as a DICOM Part 10 file (file meta included) at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return WrittenObject(str(dataset.SOPInstanceUID), str(dataset.SOPClassUID),
                         str(dataset.file_meta.TransferSyntaxUID),
                         str(dataset.SeriesInstanceUID), str(dataset.Modality), path)


def write_series(datasets: Iterable[Dataset], folder: Path) -> list[WrittenObject]:
    """Write a series into ``folder`` as ``0001.dcm``, ``0002.dcm``... (InstanceNumber)."""
    return [write_object(ds, Path(folder) / f"{int(ds.InstanceNumber):04d}.dcm")
            for ds in datasets]


def sort_along_normal(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Classic single-frame slices in ascending order along their slice normal."""
    def along(ds: Dataset) -> float:
        cosines = np.reshape(np.asarray(ds.ImageOrientationPatient, float), (2, 3))
        return float(np.dot(np.asarray(ds.ImagePositionPatient, float), np.cross(*cosines)))

    return sorted(datasets, key=along)
