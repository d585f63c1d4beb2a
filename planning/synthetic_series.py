"""The synthetic CE-MRI series: MR Image Storage, one instance per T1w slice, in the T1w's
geometry and frame of reference, labelled synthetic everywhere a viewer or TPS looks.

- ImageType DERIVED\\SECONDARY\\OTHER, SyntheticData YES, a series description that says
  SYNTHETIC, DerivationDescription and DerivationCodeSequence (DCM 123110 Artificial
  Intelligence), vcemri as Synthesizing Equipment, Source Image Sequence naming the T1w slice
  and the T2w slices it was computed from;
- no contrast agent attribute (nothing was injected);
- pixels in the T1w's scanner units (the T1w's RescaleSlope/Intercept when it has them);
- optional "SYNTHETIC" burned into the pixels, with BurnedInAnnotation to match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from config import PlanningSettings

from .common import (
    MANUFACTURER,
    copy_patient_study,
    derived_uid,
    now,
    software_version,
    synthesizing_equipment,
)

if TYPE_CHECKING:
    from synthesis import SynthesisResult

SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")
#: MR acquisition attributes copied from the T1w the synthetic image imitates.
MR_COPIED = ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType",
             "SequenceName", "RepetitionTime", "EchoTime", "EchoTrainLength", "FlipAngle",
             "MagneticFieldStrength", "ImagingFrequency", "ImagedNucleus", "SliceThickness",
             "PatientPosition", "BodyPartExamined")


def result_key(result: SynthesisResult) -> str:
    """What makes an output unique: both input series and the exact model weights."""
    return "|".join((result.t1w.info.series_uid, result.t2w.info.series_uid,
                     str(result.model.get("weights_sha256", "")),
                     str(result.model.get("architecture", "")),
                     f"align={result.alignment.mode}:{result.alignment.applied}"))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _source(sop_class: str, sop_instance: str, frame: int | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if frame is not None:
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = [_code(*SOURCE_PURPOSE)]
    return item


def _t2w_sources(result: SynthesisResult, position: float, normal: np.ndarray) -> list[Any]:
    """The T2w slices within one T2w slice spacing of a T1w slice position, measured along
    the T1w's normal (the T2w may be another plane); the nearest one at least."""
    sources = [s for s in result.t2w.sources if s.origin_mm is not None]
    if not sources:
        return list(result.t2w.sources[:1])
    along = np.array([float(np.dot(s.origin_mm, normal)) for s in sources])
    if len(sources) < 2:
        return sources
    spacing = abs(float(np.median(np.diff(np.sort(along))))) or 1.0
    near = [s for s, a in zip(sources, along, strict=True) if abs(a - position) < spacing]
    return near or [sources[int(np.argmin(np.abs(along - position)))]]


def _rescale(values: np.ndarray, t1w_header: Dataset) -> tuple[float, float, bool]:
    """(slope, intercept, write them?) for storing ``values`` (scanner units) as uint16.

    The T1w's own RescaleSlope/Intercept when it has them (top level, or a multi-frame file's
    shared or first per-frame pixel value transformation: Enhanced MR keeps them there);
    otherwise the T1w stored its scanner units as integers and so do we, unless they would not
    fit 16 bits, when a slope spreads the range over them."""
    candidates = [t1w_header]
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in (t1w_header.get(groups) or [])[:1]:
            candidates += list(group.get("PixelValueTransformationSequence") or [])
    for source in candidates:
        if "RescaleSlope" in source:
            return (float(source.RescaleSlope or 1.0),
                    float(source.get("RescaleIntercept", 0) or 0), True)
    top = float(values.max()) if values.size else 0.0
    if top <= 65535:
        return 1.0, 0.0, False
    return top / 65000.0, 0.0, True


def _stored(values: np.ndarray, t1w_header: Dataset) -> tuple[np.ndarray, float, float, bool]:
    slope, intercept, written = _rescale(values, t1w_header)
    stored = np.clip(np.rint((values - intercept) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, intercept, written


def _burn_in(pixels: np.ndarray, value: int) -> np.ndarray:
    """'SYNTHETIC' in the top-left corner, scaled to about a quarter of the image width."""
    text = Image.new("L", (60, 12), 0)
    ImageDraw.Draw(text).text((1, 0), "SYNTHETIC", fill=255)
    width = max(24, pixels.shape[1] // 4)
    mark = np.asarray(text.resize((width, max(5, width // 5)), Image.Resampling.NEAREST)) > 127
    out = pixels.copy()
    out[2:2 + mark.shape[0], 2:2 + mark.shape[1]][mark] = value
    return out


def synthetic_series(result: SynthesisResult, t1w_header: Dataset,
                     settings: PlanningSettings) -> list[Dataset]:
    """The synthetic series' datasets, ascending along the slice normal."""
    image = result.vce.image
    values = sitk.GetArrayFromImage(image)
    stored, slope, intercept, write_rescale = _stored(values, t1w_header)
    direction = np.reshape(image.GetDirection(), (3, 3))
    normal = direction[:, 2]
    spacing = image.GetSpacing()
    key = result_key(result)
    model = str(result.model.get("architecture", "model"))
    series_uid = derived_uid(key, "series")
    date, time = now()
    head = values[values > 0]
    low, high = (np.percentile(head, [1.0, 99.5]) if head.size else (0.0, 1.0))
    number = int(t1w_header.get("SeriesNumber", 0) or 0) + settings.series_number_offset
    description = settings.series_description.replace("{model}", model)
    if "SYNTHETIC" not in description.upper():
        description = f"SYNTHETIC {description}"
    derivation = (
        f"Synthetic contrast-enhanced T1w computed by {model} from the T1w and T2w series; "
        "no contrast agent was given. EDM factor "
        f"{result.edm.t1w:.3f}; institution "
        f"{result.institution.institution or 'external, closest ' + str(result.institution.closest)}"
    )[:1024]
    datasets = []
    for k in range(values.shape[0]):
        ds = Dataset()
        copy_patient_study(ds, t1w_header)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = derived_uid(key, "instance", k)
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = number
        ds.SeriesDescription = description[:64]
        ds.SeriesDate, ds.SeriesTime = date, time
        ds.ContentDate, ds.ContentTime = date, time
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = result.t1w.info.frame_of_reference_uid
        ds.PositionReferenceIndicator = t1w_header.get("PositionReferenceIndicator", "")
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = f"vcemri {model}"[:64]
        ds.SoftwareVersions = software_version()
        ds.ContributingEquipmentSequence = [synthesizing_equipment(model)]
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        ds.SyntheticData = "YES"
        ds.DerivationDescription = derivation
        ds.DerivationCodeSequence = [_code(codes.DCM.ArtificialIntelligence.value, "DCM",
                                           codes.DCM.ArtificialIntelligence.meaning)]
        t1_source = result.t1w.sources[k]
        position = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, k)))
        along = float(np.dot(position, normal))
        ds.SourceImageSequence = [
            _source(t1_source.sop_class_uid, t1_source.sop_instance_uid, t1_source.frame),
            *[_source(s.sop_class_uid, s.sop_instance_uid, s.frame)
              for s in _t2w_sources(result, along, normal)],
        ]
        for keyword in MR_COPIED:
            if keyword in t1w_header:
                setattr(ds, keyword, t1w_header.data_element(keyword).value)
        for keyword, default in (("ScanningSequence", "RM"), ("SequenceVariant", "NONE"),
                                 ("ScanOptions", ""), ("MRAcquisitionType", ""),
                                 ("EchoTime", ""), ("EchoTrainLength", ""),
                                 ("SliceThickness", "")):
            if keyword not in ds:
                setattr(ds, keyword, default)
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in
                                      (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [round(spacing[1], 6), round(spacing[0], 6)]
        ds.SpacingBetweenSlices = round(spacing[2], 4)
        ds.SliceLocation = round(along, 4)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(values.shape[1]), int(values.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        if write_rescale:
            ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
            ds.RescaleType = "US"
        ds.WindowCenter = round(float((low + high) / 2), 2)
        ds.WindowWidth = round(float(max(high - low, 1.0)), 2)
        ds.WindowCenterWidthExplanation = "synthetic CE-T1w"
        pixels = stored[k]
        if settings.burn_in_marker:
            pixels = _burn_in(pixels, int(stored.max()) or 1)
        ds.BurnedInAnnotation = "YES" if settings.burn_in_marker else "NO"
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        datasets.append(ds)
    return datasets
