"""Reading MR series into volumes with their geometry, and checking them.

A :class:`Volume` is a SimpleITK image (float32, scanner units after RescaleSlope/Intercept,
origin/spacing/direction in patient LPS mm) plus a header summary and the instances it came
from. Classic single-frame MR and multi-frame (Enhanced or Legacy Converted Enhanced) MR are
read; compressed transfer syntaxes decode through pydicom's pixel handlers (pylibjpeg).
Slices are sorted by position along the slice normal; missing and duplicate slices,
inconsistent orientation or matrix, and non-MR data are refused with a specific reason.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from config import InputError

#: Relative tolerance on slice spacing before a gap counts as missing slices.
GAP_TOLERANCE = 0.5
#: Positions closer than this (mm) along the normal are the same slice.
SAME_POSITION_MM = 0.01
#: Orientation cosines may differ this much between slices of one series.
ORIENTATION_TOLERANCE = 1e-3

MR_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}


@dataclass(frozen=True)
class SeriesInfo:
    """What the pipeline needs from a series' headers. Patient identity is kept only to
    compare series with each other; it is never logged (config.phi)."""

    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    patient_key: str
    modality: str
    description: str
    manufacturer: str
    model: str
    field_strength_t: float | None
    institution_name: str
    station_name: str
    repetition_time_ms: float | None
    echo_time_ms: float | None
    inversion_time_ms: float | None
    contrast_agent: str
    body_part: str
    image_type: tuple[str, ...]
    series_number: int | None = None
    #: the instances the series announces (ImagesInAcquisition); None: unknown
    images_in_acquisition: int | None = None
    #: ScanningSequence (SE, GR, IR, EP, RM)
    scanning_sequence: tuple[str, ...] = ()
    #: ScanOptions (FS: fat saturation, ...)
    scan_options: tuple[str, ...] = ()
    #: DiffusionBValue (s/mm2) of the instances read; a DWI series holding several b-values
    #: is read at its highest (:func:`read_series`); None: not a diffusion series
    b_value: float | None = None

    def header(self) -> dict[str, Any]:
        """DICOM-keyword view used by the configured series rules and routes, and kept in the
        node's index (no patient identity)."""
        return {
            "SeriesDescription": self.description,
            "RepetitionTime": self.repetition_time_ms,
            "EchoTime": self.echo_time_ms,
            "InversionTime": self.inversion_time_ms,
            "ContrastBolusAgent": self.contrast_agent,
            "Modality": self.modality,
            "BodyPartExamined": self.body_part,
            "InstitutionName": self.institution_name,
            "Manufacturer": self.manufacturer,
            "SeriesNumber": self.series_number,
            "ImagesInAcquisition": self.images_in_acquisition,
            "ImageType": list(self.image_type),
            "ScanOptions": list(self.scan_options),
            "DiffusionBValue": self.b_value,
        }


@dataclass(frozen=True)
class SourceInstance:
    """An instance (and frame) a slice came from, for Source Image Sequences."""

    sop_class_uid: str
    sop_instance_uid: str
    frame: int | None = None
    #: position of the slice along its series' normal (mm)
    position_mm: float | None = None
    #: ImagePositionPatient of the slice (mm), to place it along another series' normal
    origin_mm: tuple[float, float, float] | None = None


@dataclass
class Volume:
    """A series as a 3D image in scanner units, slices ascending along the normal."""

    image: sitk.Image
    info: SeriesInfo
    sources: list[SourceInstance] = field(default_factory=list)

    @property
    def array(self) -> np.ndarray:
        """(slices, rows, columns) float32 copy of the voxels. A copy, not SimpleITK's view:
        a view does not keep its image alive, and a temporary's memory gets reused."""
        return sitk.GetArrayFromImage(self.image)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(reversed(self.image.GetSize()))  # type: ignore[return-value]

    def digest(self) -> str:
        """SHA-256 of what the volume holds: its source instances, geometry and voxels
        (scanner units). Results derived from it take their identity from this."""
        import hashlib

        digest = hashlib.sha256()
        for source in self.sources:
            digest.update(f"{source.sop_instance_uid}/{source.frame}|".encode())
        image = self.image
        digest.update(repr((image.GetOrigin(), image.GetSpacing(), image.GetDirection()))
                      .encode())
        digest.update(sitk.GetArrayViewFromImage(image).tobytes())
        return digest.hexdigest()


def _number(ds: Dataset, keyword: str) -> float | None:
    """A numeric header value, or None when it is absent or not a finite number (an
    unreadable optional value is ignored, never kept as another type)."""
    value = ds.get(keyword)
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


#: Optional numeric attributes :func:`series_info` reads; one that is present but not a
#: number is ignored for its purpose (:func:`unreadable_values` names it).
OPTIONAL_NUMBERS = ("RepetitionTime", "EchoTime", "InversionTime", "MagneticFieldStrength",
                    "SeriesNumber", "ImagesInAcquisition")


def unreadable_values(ds: Dataset) -> list[str]:
    """The optional numeric attributes of ``ds`` that are present but not finite numbers
    (keywords only: the values themselves may hold anything, patient names included)."""
    return [k for k in OPTIONAL_NUMBERS
            if k in ds and ds.get(k) not in (None, "") and _number(ds, k) is None]


def _first(ds: Dataset, sequence: str, keyword: str) -> Any:
    """A value from a multi-frame file's shared functional groups (or the top level)."""
    if keyword in ds:
        return ds.get(keyword)
    for group in ds.get("SharedFunctionalGroupsSequence", []):
        for item in group.get(sequence, []):
            if keyword in item:
                return item.get(keyword)
    return None


def _contrast_agent(ds: Dataset) -> str:
    """The contrast agent the header says was given, wherever the IOD keeps it: ContrastBolusAgent
    (Contrast/Bolus module), ContrastBolusAgentSequence (Enhanced Contrast/Bolus module) or a
    Contrast/Bolus Usage functional group with ContrastBolusAgentAdministered YES (Enhanced
    MR, shared or per frame); empty when none was."""
    agent = str(ds.get("ContrastBolusAgent", "") or "").strip()
    if agent:
        return agent
    if ds.get("ContrastBolusAgentSequence"):
        return "contrast agent (ContrastBolusAgentSequence)"
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in ds.get(groups) or []:
            for usage in group.get("ContrastBolusUsageSequence") or []:
                if str(usage.get("ContrastBolusAgentAdministered", "")).upper() == "YES":
                    return "contrast agent (ContrastBolusUsageSequence)"
    return ""


def _values(value: Any) -> list[Any]:
    """A multi-valued element's values (one value, or none, as a list)."""
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) \
        else [value]


def _count(ds: Dataset) -> int | None:
    """The instances a series announces (ImagesInAcquisition); a value that is not a plausible
    count is ignored."""
    announced = _number(ds, "ImagesInAcquisition")
    if announced is None or not announced.is_integer() or not 0 < announced < 100_000:
        return None
    return int(announced)


def series_info(ds: Dataset) -> SeriesInfo:
    """Header summary of the series ``ds`` belongs to: the one reader of series headers, for
    the pipeline, ``vcemri process`` and the node's spool alike (classic and Enhanced MR:
    timing and contrast from functional groups where the top level has none)."""
    mr_timing = {
        keyword: _number(ds, keyword) if keyword in ds else _number_from_groups(ds, keyword)
        for keyword in ("RepetitionTime", "EchoTime", "InversionTime")
    }
    number = _number(ds, "SeriesNumber")
    return SeriesInfo(
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        patient_key=f"{ds.get('PatientID', '')}|{ds.get('IssuerOfPatientID', '')}",
        modality=str(ds.get("Modality", "")),
        description=str(ds.get("SeriesDescription", "") or ""),
        manufacturer=str(ds.get("Manufacturer", "") or ""),
        model=str(ds.get("ManufacturerModelName", "") or ""),
        field_strength_t=_number(ds, "MagneticFieldStrength"),
        institution_name=str(ds.get("InstitutionName", "") or ""),
        station_name=str(ds.get("StationName", "") or ""),
        repetition_time_ms=mr_timing["RepetitionTime"],
        echo_time_ms=mr_timing["EchoTime"],
        inversion_time_ms=mr_timing["InversionTime"],
        contrast_agent=_contrast_agent(ds),
        body_part=str(ds.get("BodyPartExamined", "") or ""),
        image_type=tuple(str(v) for v in (ds.get("ImageType") or [])),
        series_number=int(number) if number is not None and number.is_integer() else None,
        images_in_acquisition=_count(ds),
        scanning_sequence=tuple(str(v) for v in _values(ds.get("ScanningSequence"))),
        scan_options=tuple(str(v) for v in _values(ds.get("ScanOptions"))),
        b_value=_b_value(ds),
    )


def _b_value(ds: Dataset) -> float | None:
    """DiffusionBValue (s/mm2) at the top level or in an Enhanced MR's MR Diffusion
    functional group (shared, else the first frame's); None when the series is not DWI."""
    if "DiffusionBValue" in ds:
        return _number(ds, "DiffusionBValue")
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in (ds.get(groups) or [])[:1]:
            for item in group.get("MRDiffusionSequence") or []:
                value = _float(item.get("DiffusionBValue"))
                if value is not None and np.isfinite(value):
                    return value
    return None


def _number_from_groups(ds: Dataset, keyword: str) -> float | None:
    sequences = {"RepetitionTime": "MRTimingAndRelatedParametersSequence",
                 "EchoTime": "MREchoSequence", "InversionTime": "MRModifierSequence"}
    alternatives = {"EchoTime": "EffectiveEchoTime", "InversionTime": "InversionTimes"}
    for name in (keyword, alternatives.get(keyword, keyword)):
        value = _first(ds, sequences[keyword], name)
        if isinstance(value, (list, pydicom.multival.MultiValue)):
            value = value[0] if value else None
        if value not in (None, ""):
            try:
                return float(value)
            except (TypeError, ValueError):
                return None
    return None


@dataclass
class _Slice:
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    pixels: np.ndarray
    source: SourceInstance
    thickness: float | None


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
        raise InputError(f"{path.name} is not a readable DICOM file ({exc})") from None


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
    name = getattr(syntax, "name", str(syntax))
    try:
        raw = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for bad pixel data
        raise InputError(
            f"cannot decode the pixel data of {path.name} ({name}): {exc}",
            hint="a decoder for this transfer syntax may be missing, or the file is truncated",
        ) from None
    return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)


def _classic_slice(ds: Dataset, path: Path) -> _Slice:
    try:
        position = np.asarray(ds.ImagePositionPatient, float)
        orientation = np.asarray(ds.ImageOrientationPatient, float)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
    except (AttributeError, ValueError, TypeError):
        raise InputError(
            f"{path.name} has no usable image plane (ImagePositionPatient, "
            "ImageOrientationPatient, PixelSpacing)"
        ) from None
    return _Slice(position, orientation, spacing, _pixels(ds, path),  # type: ignore[arg-type]
                  SourceInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID)),
                  _number(ds, "SliceThickness"))


def _frame_slices(ds: Dataset, path: Path) -> list[_Slice]:
    frames = _pixels(ds, path)
    if frames.ndim == 2:
        frames = frames[None]
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != len(frames):
        raise InputError(f"{path.name}: {len(frames)} frames but {len(per_frame)} per-frame "
                         "functional groups")
    slices = []
    for index, (pixels, groups) in enumerate(zip(frames, per_frame, strict=True)):
        def pick(sequence: str, keyword: str, groups: Dataset = groups) -> Any:
            for source in (groups, shared):
                for item in source.get(sequence, []):
                    if keyword in item:
                        return item.get(keyword)
            return None

        position = pick("PlanePositionSequence", "ImagePositionPatient")
        orientation = pick("PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = pick("PixelMeasuresSequence", "PixelSpacing")
        if position is None or orientation is None or spacing is None:
            raise InputError(f"{path.name}: frame {index + 1} has no plane position, "
                             "orientation or pixel spacing")
        slope = pick("PixelValueTransformationSequence", "RescaleSlope")
        intercept = pick("PixelValueTransformationSequence", "RescaleIntercept")
        if slope is not None and "RescaleSlope" not in ds:
            pixels = pixels * float(slope) + float(intercept or 0.0)
        slices.append(_Slice(np.asarray(position, float), np.asarray(orientation, float),
                             (float(spacing[0]), float(spacing[1])), pixels.astype(np.float32),
                             SourceInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                            index + 1),
                             _float(pick("PixelMeasuresSequence", "SliceThickness"))))
    return slices


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def dicom_files(folder: Path) -> list[Path]:
    """Regular files under ``folder`` (recursively), skipping hidden ones and DICOMDIRs."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in sorted(names)
                  if not n.startswith(".") and n.upper() != "DICOMDIR"]
    return files


#: File names SimpleITK reads as one image (research exports, training data): NIfTI, NRRD,
#: MetaImage.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def is_image_file(path: Path) -> bool:
    """Whether ``path`` names a NIfTI/NRRD/MetaImage file rather than DICOM."""
    return Path(path).is_file() and str(path).lower().endswith(IMAGE_SUFFIXES)


def read_image_file(path: Path) -> Volume:
    """A NIfTI (or NRRD, MetaImage) volume as a :class:`Volume`, reoriented to LPS (axial
    slices, as an axial DICOM series). Such files carry no patient, study, scanner or sequence
    identity: those header fields are empty, so the pipeline relies on the intensities (e.g.
    to recognize an institution) and the caller vouches that the files belong together."""
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as exc:
        raise InputError(f"{path.name} is not a readable image file "
                         f"({str(exc).strip().splitlines()[-1][:200]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name} is not one 3D scalar volume ({image.GetDimension()}D, "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s))")
    image = sitk.DICOMOrient(image, "LPS")
    info = SeriesInfo(series_uid="", study_uid="", frame_of_reference_uid="", patient_key="",
                      modality="MR", description="", manufacturer="", model="",
                      field_strength_t=None, institution_name="", station_name="",
                      repetition_time_ms=None, echo_time_ms=None, inversion_time_ms=None,
                      contrast_agent="", body_part="", image_type=())
    return Volume(image, info)


def read_volume(path: Path) -> Volume:
    """A DICOM series (folder or files) or an image file (:data:`IMAGE_SUFFIXES`)."""
    return read_image_file(path) if is_image_file(path) else read_series(path)


def read_series(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> Volume:
    """Read one MR series (a folder or its files) into a :class:`Volume`."""
    paths = Path(paths) if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    files = dicom_files(paths) if isinstance(paths, Path) and paths.is_dir() else (
        [paths] if isinstance(paths, Path) else list(paths))
    if not files:
        raise InputError("no files to read: the series folder is empty")
    datasets = [(path, _read(path)) for path in files]
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) != 1:
        raise InputError(f"expected one series, found {len(series)} series UIDs in the files")
    first = datasets[0][1]
    info = series_info(first)
    if info.modality != "MR":
        raise InputError(f"series {info.series_uid} is {info.modality or 'of no modality'}, "
                         "not MR")
    sop_classes = {str(ds.get("SOPClassUID", "")) for _, ds in datasets}
    unknown = sop_classes - set(MR_STORAGE)
    if unknown:
        raise InputError(f"series {info.series_uid} holds {', '.join(sorted(unknown))}, "
                         f"not an MR image storage class ({', '.join(MR_STORAGE.values())})")
    datasets, info = _highest_b_value(datasets, info)
    slices: list[_Slice] = []
    seen: set[str] = set()
    for path, ds in datasets:
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            continue  # the same instance twice (resent) is one instance
        seen.add(uid)
        if "PerFrameFunctionalGroupsSequence" in ds:
            slices += _frame_slices(ds, path)
        else:
            slices.append(_classic_slice(ds, path))
    return _assemble(slices, info)


def _highest_b_value(datasets: list[tuple[Path, Dataset]], info: SeriesInfo
                     ) -> tuple[list[tuple[Path, Dataset]], SeriesInfo]:
    """A diffusion series that holds several b-values (b = 0 and b = 1000 instances at each
    position, as scanners send DWI) is read at its highest b-value: the diffusion-weighted
    image a model uses; the b = 0 image is a T2-weighted EPI the T2w series shows better."""
    values = {_number(ds, "DiffusionBValue") for _, ds in datasets}
    if len(values) < 2 or None in values:
        return datasets, info
    highest = max(v for v in values if v is not None)
    kept = [(p, ds) for p, ds in datasets if _number(ds, "DiffusionBValue") == highest]
    return kept, replace(info, b_value=highest)


def _assemble(slices: Sequence[_Slice], info: SeriesInfo) -> Volume:
    uid = info.series_uid
    orientation = slices[0].orientation
    if any(np.abs(s.orientation - orientation).max() > ORIENTATION_TOLERANCE for s in slices):
        raise InputError(f"series {uid}: slices have different orientations (not one volume)")
    shape = slices[0].pixels.shape
    if any(s.pixels.shape != shape for s in slices):
        raise InputError(f"series {uid}: slices have different matrix sizes")
    if any(np.abs(np.subtract(s.spacing, slices[0].spacing)).max() > 1e-4 for s in slices):
        raise InputError(f"series {uid}: slices have different pixel spacings")
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    along = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(along, kind="stable")
    ordered = [slices[i] for i in order]
    along = along[order]
    if len(ordered) < 2:
        raise InputError(f"series {uid} has a single slice; a volume needs at least 2")
    gaps = np.diff(along)
    if (gaps < SAME_POSITION_MM).any():
        k = int(np.argmax(gaps < SAME_POSITION_MM))
        raise InputError(f"series {uid}: duplicate slices at {along[k]:.2f} mm along the normal "
                         "(two instances at one position)")
    spacing = float(np.median(gaps))
    if (np.abs(gaps - spacing) > GAP_TOLERANCE * spacing).any():
        k = int(np.argmax(np.abs(gaps - spacing) > GAP_TOLERANCE * spacing))
        raise InputError(
            f"series {uid}: missing or irregular slices between {along[k]:.2f} and "
            f"{along[k + 1]:.2f} mm (gap {gaps[k]:.2f} mm, expected {spacing:.2f} mm)"
        )
    in_plane = [float(np.dot(s.position - ordered[0].position, row)) for s in ordered]
    drift = max(abs(v) for v in in_plane + [float(np.dot(s.position - ordered[0].position, column))
                                            for s in ordered])
    if drift > 0.5 * max(ordered[0].spacing):
        raise InputError(f"series {uid}: slice positions drift in-plane by {drift:.1f} mm "
                         "(a sheared or mixed stack)")
    for s, position in zip(ordered, along, strict=True):
        s.source = replace(s.source, position_mm=round(float(position), 4),
                           origin_mm=tuple(round(float(v), 4) for v in s.position))
    array = np.stack([s.pixels for s in ordered]).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetOrigin([float(v) for v in ordered[0].position])
    row_spacing, column_spacing = ordered[0].spacing
    image.SetSpacing([column_spacing, row_spacing, spacing])
    image.SetDirection([float(v) for v in np.stack([row, column, normal], axis=1).ravel()])
    return Volume(image, info, [s.source for s in ordered])


def scan_folder(folder: Path) -> dict[str, list[Path]]:
    """The DICOM files under ``folder`` grouped by SeriesInstanceUID (headers only).

    Files that are not DICOM are skipped; a folder with no DICOM at all is an error.
    """
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in dicom_files(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError):
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if uid:
            groups[uid].append(path)
    if not groups:
        raise InputError(f"no DICOM series found under {folder}")
    return dict(groups)


def check_pair(t1w: Volume, t2w: Volume, name: str = "T2w") -> None:
    """The T1w and another input (``name``: T2w, DWI, ...) must come from one patient, one
    study and one frame of reference."""
    a, b = t1w.info, t2w.info
    if a.patient_key != b.patient_key:
        raise InputError(f"T1w series {a.series_uid} and {name} series {b.series_uid} belong "
                         "to different patients")
    if a.study_uid != b.study_uid:
        raise InputError(f"T1w and {name} come from different studies ({a.study_uid} and "
                         f"{b.study_uid})")
    if a.frame_of_reference_uid != b.frame_of_reference_uid:
        raise InputError(
            f"T1w and {name} have different frames of reference ({a.frame_of_reference_uid} "
            f"and {b.frame_of_reference_uid}); their alignment cannot be trusted"
        )
