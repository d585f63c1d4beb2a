"""Coded values of the RT Structure Set IOD (PS3.3 C.8.8.5, C.8.8.6, C.8.8.8)."""

from __future__ import annotations

from enum import Enum


class ROIInterpretedType(Enum):
    """RT ROI Interpreted Type (3006,00A4), the defined terms a TPS sorts structures by.
    vcemri's helpers are CONTROL (where to look) or EXTERNAL (the body), never a target."""

    EXTERNAL = "EXTERNAL"
    PTV = "PTV"
    CTV = "CTV"
    GTV = "GTV"
    ORGAN = "ORGAN"
    AVOIDANCE = "AVOIDANCE"
    CONTROL = "CONTROL"
    CAVITY = "CAVITY"
    MARKER = "MARKER"


class ContourGeometricType(Enum):
    """Contour Geometric Type (3006,0042)."""

    POINT = "POINT"
    OPEN_PLANAR = "OPEN_PLANAR"
    OPEN_NONPLANAR = "OPEN_NONPLANAR"
    CLOSED_PLANAR = "CLOSED_PLANAR"


class ROIGenerationAlgorithm(Enum):
    """ROI Generation Algorithm (3006,0036)."""

    AUTOMATIC = "AUTOMATIC"
    SEMIAUTOMATIC = "SEMIAUTOMATIC"
    MANUAL = "MANUAL"
