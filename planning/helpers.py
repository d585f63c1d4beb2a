"""The helper regions drawn for the oncologist (never a target volume: they are CONTROL
structures that point at where to look):

- enhancement: where the synthetic CE exceeds the T1w by ``enhancement_threshold`` (relative),
  inside the head, opened with a 1-voxel in-plane structuring element against speckle;
- external: the body outline (the largest connected part of the head mask the pipeline
  computed);
- low confidence: where the model's confidence is below ``low_confidence_threshold``.

Regions smaller than ``min_region_mm3`` are dropped; an empty helper is omitted and noted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from config import PlanningSettings

from .rtstruct import ROIInterpretedType

if TYPE_CHECKING:
    from synthesis import SynthesisResult

#: (suffix, interpreted type, RGB display colour)
HELPERS = {
    "Enhancement": (ROIInterpretedType.CONTROL, (255, 200, 0)),
    "External": (ROIInterpretedType.EXTERNAL, (0, 200, 80)),
    "LowConfidence": (ROIInterpretedType.CONTROL, (255, 90, 0)),
}


@dataclass(frozen=True)
class Helper:
    """One helper region on the synthetic series' grid (slices, rows, columns)."""

    name: str
    interpreted_type: ROIInterpretedType
    colour: tuple[int, int, int]
    mask: np.ndarray


def _clean(mask: np.ndarray, reference: sitk.Image, min_mm3: float, opening: bool,
           largest_only: bool = False) -> np.ndarray:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(reference)
    if opening:
        image = sitk.BinaryMorphologicalOpening(image, [1, 1, 0])
    components = sitk.ConnectedComponent(image)
    voxel_mm3 = float(np.prod(reference.GetSpacing()))
    minimum = int(np.ceil(min_mm3 / voxel_mm3))
    kept = sitk.GetArrayFromImage(sitk.RelabelComponent(components,
                                                        minimumObjectSize=max(minimum, 1)))
    return kept == 1 if largest_only else kept > 0


def helper_regions(result: SynthesisResult, settings: PlanningSettings) -> tuple[list[Helper],
                                                                                 list[str]]:
    """The non-empty helpers and a note for each one that came out empty."""
    reference = result.vce.image
    vce = sitk.GetArrayFromImage(reference)
    t1w = np.asarray(result.t1w.array, np.float32)
    if result.foreground is not None:
        head = sitk.GetArrayFromImage(result.foreground) > 0
    else:
        head = vce > 0
    floor = np.percentile(t1w[head], 5) if head.any() else 0.0
    masks = {
        "Enhancement": _clean(head & (t1w > floor) & (vce >= (1 + settings.enhancement_threshold)
                                                      * t1w), reference,
                              settings.min_region_mm3, opening=True),
        # The body is one piece: specks of noise above the threshold are not "external".
        "External": _clean(head, reference, settings.min_region_mm3, opening=False,
                           largest_only=True),
    }
    if result.confidence is not None:
        confidence = sitk.GetArrayFromImage(result.confidence)
        masks["LowConfidence"] = _clean(head & (confidence < settings.low_confidence_threshold),
                                        reference, settings.min_region_mm3, opening=True)
    helpers, notes = [], []
    for suffix, mask in masks.items():
        name = f"{settings.helper_prefix}{suffix}"
        if not mask.any():
            notes.append(f"{name} omitted: empty")
            continue
        kind, colour = HELPERS[suffix]
        helpers.append(Helper(name, kind, colour, mask))
    if result.confidence is None:
        notes.append(f"{settings.helper_prefix}LowConfidence omitted: no confidence map")
    return helpers, notes
