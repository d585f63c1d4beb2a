"""Lesion label maps on the model grid, for CG-SAMR (seed 002) as an augmentation source: a
tumour's quantised intensity map (seed 004's three levels), edits of it (moved, grown,
shrunk, made necrotic), and the region a painter fills.

Levels follow seed 004 (FIG. 4: multi-Otsu thresholds of the tumour's CE-T1w, three
classes): 1 the darkest third of the enhancement classes (necrosis or weak uptake), 2 the
middle, 3 the brightest. A map is an int8 (H, W) array, 0 outside the lesion. All sizes are in
model-grid pixels (256 x 224 over the T1w's field of view: about 1 mm at the simulated sites).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

LEVELS = 3
#: Fewest lesion pixels on a slice for it to count as a lesion slice (smaller cross-sections
#: are a lesion's tip, whose three classes cannot be told apart).
MIN_PIXELS = 12
#: The painted region reaches this far beyond the old and the new lesion (pixels): the
#: lesion's edge and the tissue it displaces are synthesised too.
MARGIN_PX = 4
#: The blending weight's Gaussian smoothing (pixels; seed 004: "Gaussian smoothing and
#: blending" of the painted lesion into the slice).
BLEND_SIGMA_PX = 1.5
#: How far beyond the region the blending can reach (pixels): scipy's separable Gaussian
#: filter stops 6 pixels (4 sigma) along rows and columns, so 6 x sqrt(2) diagonally.
BLEND_REACH_PX = 9

Edit = Literal["moved", "grown", "shrunk", "necrotic"]
EDITS: tuple[Edit, ...] = ("moved", "grown", "shrunk", "necrotic")


def quantise(ce: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The lesion label map of one slice: ``mask``'s pixels split into three levels by the
    CE-T1w's multi-Otsu thresholds (seed 004 FIG. 4); 0 elsewhere. A lesion whose CE values
    cannot be split three ways (too few distinct values) is all level 2."""
    from skimage.filters import threshold_multiotsu

    labels = np.zeros(mask.shape, np.int8)
    values = np.asarray(ce, np.float64)[mask]
    if values.size == 0:
        return labels
    try:
        low, high = threshold_multiotsu(values, classes=LEVELS)
    except ValueError:
        labels[mask] = 2
        return labels
    labels[mask] = 1 + (values > low).astype(np.int8) + (values > high).astype(np.int8)
    return labels


def one_hot(labels: np.ndarray) -> np.ndarray:
    """(LEVELS, H, W) float32: channel k is level k + 1."""
    return np.stack([(labels == k).astype(np.float32) for k in range(1, LEVELS + 1)])


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` grown by ``pixels`` (a disc)."""
    from scipy import ndimage

    if pixels <= 0:
        return mask.astype(bool)
    y, x = np.ogrid[-pixels:pixels + 1, -pixels:pixels + 1]
    return ndimage.binary_dilation(mask, structure=(x * x + y * y) <= pixels * pixels)


@dataclass(frozen=True)
class EditedLesion:
    """An edit of a slice's lesion: what was done, the new label map and the region to paint
    (the old and the new lesion, with :data:`MARGIN_PX` around them)."""

    edit: Edit
    labels: np.ndarray
    region: np.ndarray


def _scaled(labels: np.ndarray, factor: float) -> np.ndarray:
    """``labels`` scaled by ``factor`` about its centroid (nearest neighbour)."""
    from scipy import ndimage

    rows, cols = np.nonzero(labels)
    centre = np.array([rows.mean(), cols.mean()])
    # output pixel p takes input pixel centre + (p - centre) / factor
    return ndimage.affine_transform(labels, np.eye(2) / factor,
                                    offset=centre - centre / factor, order=0, mode="constant",
                                    cval=0).astype(np.int8)


def _shifted(labels: np.ndarray, by: tuple[int, ...]) -> np.ndarray:
    """``labels`` moved by ``by`` (rows, columns) pixels; what leaves the grid is lost."""
    from scipy import ndimage

    return ndimage.shift(labels, by, order=0, mode="constant", cval=0).astype(np.int8)


def _necrotic(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The lesion with a necrotic core (level 1) inside an enhancing rim (level 3): the core
    is the part deeper than a drawn fraction (40-70 %) of the lesion's largest depth."""
    from scipy import ndimage

    lesion = labels > 0
    depth = ndimage.distance_transform_edt(lesion)
    core = depth > rng.uniform(0.4, 0.7) * depth.max()
    out = np.where(lesion, np.int8(3), np.int8(0))
    out[core] = 1
    return out


def edit_lesion(labels: np.ndarray, head: np.ndarray, rng: np.random.Generator,
                edit: Edit | None = None, tries: int = 8) -> EditedLesion | None:
    """A random edit of a slice's lesion (``labels``), kept inside ``head`` (bool, the
    slice's head): moved by up to 16 pixels, grown 1.2-1.6x or shrunk 0.5-0.85x about its
    centroid, or made necrotic. None when no draw of ``tries`` keeps the lesion in the head
    or the slice has no lesion of :data:`MIN_PIXELS`."""
    lesion = labels > 0
    if lesion.sum() < MIN_PIXELS:
        return None
    kind: Edit = edit or EDITS[int(rng.integers(len(EDITS)))]
    for _ in range(tries):
        if kind == "moved":
            new = _shifted(labels, tuple(int(v) for v in rng.integers(-16, 17, 2)))
        elif kind == "grown":
            new = _scaled(labels, float(rng.uniform(1.2, 1.6)))
        elif kind == "shrunk":
            new = _scaled(labels, float(rng.uniform(0.5, 0.85)))
        else:
            new = _necrotic(labels, rng)
        if (new > 0).sum() >= MIN_PIXELS // 2 and head[new > 0].all():
            return EditedLesion(kind, new, dilate(lesion | (new > 0), MARGIN_PX))
    return None


def blend_weight(region: np.ndarray) -> np.ndarray:
    """The painted image's weight per pixel (0-1): the region Gaussian-smoothed, then 1 on the
    region's inner part, so the painted lesion meets the slice without a seam."""
    from scipy import ndimage

    soft = ndimage.gaussian_filter(region.astype(np.float32), BLEND_SIGMA_PX)
    inner = ndimage.binary_erosion(region, iterations=2)
    return np.where(inner, 1.0, np.clip(soft, 0.0, 1.0)).astype(np.float32)
