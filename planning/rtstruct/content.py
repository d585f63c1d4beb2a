"""The content items of an RT Structure Set (PS3.3 C.8.8.5 Structure Set, C.8.8.6 ROI
Contour, C.8.8.8 RT ROI Observations), each a pydicom ``Dataset`` checked when it is built,
and the tracing of a mask's outlines into patient coordinates.

Tracing: OpenCV finds each slice's outer boundaries and holes (as rt-utils does); pixel
centres map to patient coordinates with the correct spacing, x = IPP + column *
PixelSpacing[1] * row direction + row * PixelSpacing[0] * column direction (rt-utils swaps
the two spacings, see ``planning.rtstruct``). Holes are separate contours inside their outline
(even-odd, as TPSs read them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import cv2
import numpy as np
from pydicom.dataset import Dataset

from .enum import ContourGeometricType, ROIGenerationAlgorithm, ROIInterpretedType

#: Longest value of a LO (Long String) attribute such as ROIName (PS3.5 6.2).
LONG_STRING = 64


class Region(Protocol):
    """A structure to write: its name, interpreted type, display colour (RGB 0-255) and mask
    on the referenced series' grid (slices ascending along the normal, rows, columns)."""

    name: str
    interpreted_type: ROIInterpretedType
    colour: tuple[int, int, int]
    mask: np.ndarray


def mask_outlines(mask: np.ndarray) -> list[np.ndarray]:
    """Boundary polygons (column, row pixel indices) of a 2D mask, outlines and holes.

    A region one or two pixels thin traces to fewer than three distinct points, which is no
    polygon; it is written as the square around those pixels (half a pixel out) instead.
    """
    found, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in found:
        points = contour[:, 0, :].astype(np.float64)
        if len(np.unique(points, axis=0)) < 3:
            (c0, r0), (c1, r1) = points.min(0) - 0.5, points.max(0) + 0.5
            points = np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1]])
        polygons.append(points)
    return polygons


def to_patient(polygon: np.ndarray, image: Dataset) -> np.ndarray:
    """(N, 2) column, row pixel positions on ``image`` -> (N, 3) patient coordinates (mm)."""
    origin = np.asarray(image.ImagePositionPatient, float)
    cosines = np.asarray(image.ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
    return (origin[None, :]
            + polygon[:, 0:1] * column_spacing * cosines[None, :3]
            + polygon[:, 1:2] * row_spacing * cosines[None, 3:])


def image_reference(image: Dataset) -> Dataset:
    """A Contour Image Sequence item: the image a contour lies on."""
    item = Dataset()
    item.ReferencedSOPClassUID = image.SOPClassUID
    item.ReferencedSOPInstanceUID = image.SOPInstanceUID
    return item


class Contour(Dataset):
    """One Contour Sequence item: a polygon (mm) on one referenced image."""

    def __init__(self, points_mm: np.ndarray, image: Dataset,
                 geometric_type: ContourGeometricType = ContourGeometricType.CLOSED_PLANAR
                 ) -> None:
        super().__init__()
        points = np.asarray(points_mm, float)
        if points.ndim != 2 or points.shape[1] != 3 or not np.isfinite(points).all():
            raise ValueError(f"contour points must be finite (N, 3) mm, not {points.shape}")
        if geometric_type is ContourGeometricType.CLOSED_PLANAR and len(points) < 3:
            raise ValueError(f"a closed planar contour needs 3 points or more, not {len(points)}")
        self.ContourImageSequence = [image_reference(image)]
        self.ContourGeometricType = geometric_type.value
        self.NumberOfContourPoints = len(points)
        self.ContourData = [f"{v:.3f}" for v in points.ravel()]


class StructureSetROI(Dataset):
    """One Structure Set ROI Sequence item: the ROI's number, name and frame of reference."""

    def __init__(self, number: int, name: str, frame_of_reference_uid: str, *,
                 algorithm: ROIGenerationAlgorithm = ROIGenerationAlgorithm.AUTOMATIC,
                 description: str = "") -> None:
        super().__init__()
        if number < 1:
            raise ValueError(f"ROI numbers start at 1, not {number}")
        if not name or len(name) > LONG_STRING:
            raise ValueError(f"ROI name {name!r} must have 1-{LONG_STRING} characters")
        self.ROINumber = number
        self.ReferencedFrameOfReferenceUID = frame_of_reference_uid
        self.ROIName = name
        self.ROIGenerationAlgorithm = algorithm.value
        if description:
            self.ROIGenerationDescription = description[:LONG_STRING]


class ROIContour(Dataset):
    """One ROI Contour Sequence item: the ROI's display colour and contours."""

    def __init__(self, roi_number: int, colour: tuple[int, int, int],
                 contours: Sequence[Contour]) -> None:
        super().__init__()
        if len(colour) != 3 or any(not 0 <= int(c) <= 255 for c in colour):
            raise ValueError(f"ROI display colour {colour} is not RGB in 0-255")
        self.ReferencedROINumber = roi_number
        self.ROIDisplayColor = [int(c) for c in colour]
        self.ContourSequence = list(contours)


class RTROIObservation(Dataset):
    """One RT ROI Observations Sequence item: how a TPS should interpret the ROI."""

    def __init__(self, number: int, roi_number: int,
                 interpreted_type: ROIInterpretedType) -> None:
        super().__init__()
        self.ObservationNumber = number
        self.ReferencedROINumber = roi_number
        self.RTROIInterpretedType = ROIInterpretedType(interpreted_type).value
        self.ROIInterpreter = ""


class ReferencedFrameOfReference(Dataset):
    """One Referenced Frame of Reference Sequence item: the frame, study, series and every
    image the structure set is drawn on."""

    #: Referenced SOP Class of the study reference: Detached Study Management (retired), the
    #: value TPSs expect there.
    STUDY_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"

    def __init__(self, images: Sequence[Dataset]) -> None:
        super().__init__()
        if not images:
            raise ValueError("a structure set references at least one image")
        first = images[0]
        series = Dataset()
        series.SeriesInstanceUID = first.SeriesInstanceUID
        series.ContourImageSequence = [image_reference(image) for image in images]
        study = Dataset()
        study.ReferencedSOPClassUID = self.STUDY_SOP_CLASS
        study.ReferencedSOPInstanceUID = first.StudyInstanceUID
        study.RTReferencedSeriesSequence = [series]
        self.FrameOfReferenceUID = first.FrameOfReferenceUID
        self.RTReferencedStudySequence = [study]
