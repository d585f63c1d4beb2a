"""Our RT Structure Set writer, split the way highdicom splits an IOD: ``sop`` (the object),
``content`` (its items and the mask tracing), ``enum`` (its coded values).

Why not rt-utils' writer: it scales the row direction by PixelSpacing[0], the spacing between
*rows* (qurit/rt-utils#92), so contours on non-square pixels land in the wrong place, and it
needs the series re-read from disk. rt-utils remains the independent reader the tests compare
our structure sets against.
"""

from .content import (
    Contour,
    ReferencedFrameOfReference,
    Region,
    ROIContour,
    RTROIObservation,
    StructureSetROI,
    mask_outlines,
    to_patient,
)
from .enum import ContourGeometricType, ROIGenerationAlgorithm, ROIInterpretedType
from .sop import RTStructureSet

__all__ = [
    "Contour",
    "ContourGeometricType",
    "ROIContour",
    "ROIGenerationAlgorithm",
    "ROIInterpretedType",
    "RTROIObservation",
    "RTStructureSet",
    "ReferencedFrameOfReference",
    "Region",
    "StructureSetROI",
    "mask_outlines",
    "to_patient",
]
