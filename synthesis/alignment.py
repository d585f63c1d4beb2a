"""Putting the T2w on the T1w grid: resampling, and rigid registration by mutual information
when the two are misaligned (seed 000: "rigid registration was applied to fine-tune the
alignment, when necessary"; FIG. 10 shows what misalignment does to synthesis).

``mode="auto"`` registers, measures how far the found transform moves the head (the largest
displacement of the corners of the T1w's central region), and applies it only beyond the
tolerance; ``"always"`` applies it; ``"never"`` (the default of the pipeline: series of one
session share a frame of reference) trusts the scanner. A transform implying more than
:data:`MAX_PLAUSIBLE_MM` is never applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk

from .series import Volume

AlignMode = Literal["auto", "always", "never"]


@dataclass(frozen=True)
class Alignment:
    """What was done to the T2w: the transform (T1w -> T2w physical points, Euler 3D
    parameters: 3 angles in radians, 3 translations in mm, about ``centre``), the largest
    displacement it implies inside the head (mm), and whether it was applied."""

    mode: str
    registered: bool
    applied: bool
    parameters: tuple[float, ...]
    centre: tuple[float, ...]
    displacement_mm: float
    metric: float | None
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode, "registered": self.registered, "applied": self.applied,
            "euler_parameters": [round(p, 6) for p in self.parameters],
            "centre_mm": [round(c, 3) for c in self.centre],
            "displacement_mm": round(self.displacement_mm, 3),
            "mattes_mi": None if self.metric is None else round(self.metric, 5),
            "note": self.note,
        }


IDENTITY = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
#: Largest movement between two series of one session that registration may correct (mm).
MAX_PLAUSIBLE_MM = 15.0


def resample_onto(moving: Volume, reference: Volume,
                  transform: sitk.Transform | None = None) -> Volume:
    """``moving`` on ``reference``'s grid (linear interpolation, 0 outside)."""
    image = sitk.Resample(moving.image, reference.image, transform or sitk.Transform(),
                          sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return Volume(image, moving.info, moving.sources)


def field_overlap(reference: Volume, other: Volume) -> float:
    """Fraction of ``reference``'s voxels that fall inside ``other``'s field of view (world
    coordinates: 1.0 when it covers the reference entirely, 0.0 when they do not meet)."""
    ones = sitk.Image(other.image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(other.image)
    inside = sitk.Resample(ones, reference.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return float(sitk.GetArrayViewFromImage(inside).mean())


def _largest_displacement(transform: sitk.Euler3DTransform, reference: sitk.Image) -> float:
    size = np.array(reference.GetSize()) - 1
    corners = [np.array(c) * size for c in np.ndindex(2, 2, 2)]
    central = [0.25 * size + 0.5 * c for c in corners]  # the middle half: the head, not air
    points = [reference.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
              for c in central]
    return float(max(np.linalg.norm(np.subtract(transform.TransformPoint(p), p)) for p in points))


def register_rigid(fixed: Volume, moving: Volume, seed: int = 1) -> tuple[sitk.Euler3DTransform,
                                                                           float]:
    """Rigid (Euler 3D) registration of ``moving`` to ``fixed`` by Mattes mutual information
    (it copes with the different contrasts of T1w and T2w), sampled inside the T1w's Otsu
    foreground, two resolution levels, started from the scanner's alignment (identity).
    Repeatable to 1e-9 (``seed`` must not be 0, which SimpleITK reads as "seed from the
    clock"; the last bits vary with ITK's threaded smoothing).
    Reliable for T2w spin-echo data of clinical resolution; a fat-suppressed STIR T2w
    carries too little shared structure for it (see README)."""
    fixed_image = sitk.Cast(fixed.image, sitk.sitkFloat32)
    moving_image = sitk.Cast(moving.image, sitk.sitkFloat32)
    transform = sitk.Euler3DTransform()
    transform.SetCenter(fixed_image.TransformContinuousIndexToPhysicalPoint(
        [(size - 1) / 2.0 for size in fixed_image.GetSize()]))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    # Regular sampling and one thread: the same result on every machine (random sampling
    # with several threads is not reproducible in ITK).
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(0.2, seed)
    method.SetNumberOfThreads(1)
    method.SetMetricFixedMask(sitk.OtsuThreshold(fixed_image, 0, 1))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed_image, moving_image)
    return transform, float(method.GetMetricValue())


def align(t1w: Volume, t2w: Volume, mode: AlignMode = "auto",
          tolerance_mm: float = 1.0) -> tuple[Volume, Alignment]:
    """The T2w on the T1w grid, registered when ``mode`` asks for it (see module doc)."""
    if mode == "never":
        return resample_onto(t2w, t1w), Alignment(mode, False, False, IDENTITY,
                                                  (0.0, 0.0, 0.0), 0.0, None)
    try:
        transform, metric = register_rigid(t1w, t2w)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1][:200]
        return resample_onto(t2w, t1w), Alignment(
            mode, False, False, IDENTITY, (0.0, 0.0, 0.0), 0.0, None,
            f"registration failed ({reason}); the scanner's alignment is kept")
    displacement = _largest_displacement(transform, t1w.image)
    # Patients move millimetres between series, not centimetres: a larger "correction" is a
    # registration that went astray, and the scanner's alignment is kept.
    plausible = displacement <= MAX_PLAUSIBLE_MM
    apply = plausible and (mode == "always" or displacement > tolerance_mm)
    note = "" if plausible else (f"registration implies {displacement:.1f} mm, more than "
                                 f"{MAX_PLAUSIBLE_MM:.0f} mm: not applied")
    alignment = Alignment(mode, True, apply, tuple(transform.GetParameters()),
                          tuple(transform.GetCenter()), displacement, metric, note)
    return resample_onto(t2w, t1w, transform if apply else None), alignment
