"""RTSTRUCT with the helper contours, referencing the synthetic series, built with pydicom.

rt-utils does not fit as the writer: it multiplies the row direction by PixelSpacing[0] (the
spacing between *rows*), so contours of non-square pixels land in the wrong place, and it
needs the series re-read from disk. We trace each slice's mask with OpenCV (as rt-utils does),
outer boundaries and holes, and map pixel centres to patient coordinates with the correct
spacing: x = IPP + column * PixelSpacing[1] * row_direction + row * PixelSpacing[0] *
column_direction. Contours are CLOSED_PLANAR on the slice they belong to; holes are separate
contours inside their outline (even-odd, as TPSs read them). rt-utils remains the independent
reader the tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage

from .common import MANUFACTURER, copy_patient_study, derived_uid, now, software_version
from .helpers import Helper


def _contours(mask: np.ndarray) -> list[np.ndarray]:
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


def rtstruct(helpers: Sequence[Helper], series: Sequence[Dataset], key: str,
             notes: Sequence[str] = ()) -> Dataset:
    """The RT Structure Set for ``helpers`` drawn on the synthetic ``series`` (ascending)."""
    first = series[0]
    ds = Dataset()
    copy_patient_study(ds, first)
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = derived_uid(key, "rtstruct")
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = derived_uid(key, "rtstruct-series")
    ds.SeriesNumber = int(first.SeriesNumber) + 1
    ds.SeriesDescription = "VCE helper contours (SYNTHETIC)"
    ds.OperatorsName = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "vcemri helpers"
    ds.SoftwareVersions = software_version()
    ds.InstanceNumber = 1
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    date, time = now()
    ds.StructureSetLabel = "VCE helpers"
    ds.StructureSetName = "SYNTHETIC helpers"
    ds.StructureSetDescription = ("Helper contours from a synthetic contrast-enhanced T1w; not "
                                  "a delineation. " + "; ".join(notes))[:1024]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.SeriesDate, ds.SeriesTime = date, time

    images = []
    for image in series:
        item = Dataset()
        item.ReferencedSOPClassUID = image.SOPClassUID
        item.ReferencedSOPInstanceUID = image.SOPInstanceUID
        images.append(item)
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = first.SeriesInstanceUID
    referenced_series.ContourImageSequence = images
    referenced_study = Dataset()
    # Detached Study Management (retired): the value TPSs expect here.
    referenced_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    referenced_study.ReferencedSOPInstanceUID = first.StudyInstanceUID
    referenced_study.RTReferencedSeriesSequence = [referenced_series]
    frame = Dataset()
    frame.FrameOfReferenceUID = first.FrameOfReferenceUID
    frame.RTReferencedStudySequence = [referenced_study]
    ds.ReferencedFrameOfReferenceSequence = [frame]

    orientation = np.asarray(first.ImageOrientationPatient, float)
    row_direction, column_direction = orientation[:3], orientation[3:]
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    rois, contours, observations = [], [], []
    for number, helper in enumerate(helpers, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = first.FrameOfReferenceUID
        roi.ROIName = helper.name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = "vcemri helper from synthetic CE-T1w"
        rois.append(roi)
        contour_set = Dataset()
        contour_set.ReferencedROINumber = number
        contour_set.ROIDisplayColor = list(helper.colour)
        items = []
        for k, image in enumerate(series):
            if not helper.mask[k].any():
                continue
            origin = np.asarray(image.ImagePositionPatient, float)
            for polygon in _contours(helper.mask[k]):
                points = (origin[None, :]
                          + polygon[:, 0:1] * column_spacing * row_direction[None, :]
                          + polygon[:, 1:2] * row_spacing * column_direction[None, :])
                item = Dataset()
                reference = Dataset()
                reference.ReferencedSOPClassUID = image.SOPClassUID
                reference.ReferencedSOPInstanceUID = image.SOPInstanceUID
                item.ContourImageSequence = [reference]
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(points)
                item.ContourData = [f"{v:.3f}" for v in points.ravel()]
                items.append(item)
        contour_set.ContourSequence = items
        contours.append(contour_set)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = helper.interpreted_type
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = rois
    ds.ROIContourSequence = contours
    ds.RTROIObservationsSequence = observations
    ds.ApprovalStatus = "UNAPPROVED"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds
