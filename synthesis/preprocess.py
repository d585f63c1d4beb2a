"""Preprocessing as seed 000 describes it: each axial slice resampled to the model's
256 x 224 matrix (bilinear, seed 000 (B) and seed 001 Methods) and back, and triangle
thresholding against background noise.

The seeds evaluate on the model grid and never go back; the node must deliver the VCE on the
acquired T1w grid, so the way back is ours. It uses SimpleITK's interpolating cubic B-spline,
which loses less of the acquired CE-T1w on a round trip to the model grid than bilinear does
on every simulated site, and restores a smooth pattern (10 periods across the field) with a
~40 times smaller RMS error than bilinear or torch's bicubic (Keys a = -0.75);
``benchmarks/resampling.py`` prints both. What the downsampling to 224 columns removed cannot
come back.

The slice resampling maps pixel centres with half-pixel alignment (``align_corners=False``):
pixel i of n rows sits at (i + 0.5) / n of the field of view in both grids, so resampling to
the model grid and back returns every structure to where it was (within half a voxel); the
way back is the exact inverse mapping, not a restoration of the detail the smaller grid lost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

#: The model's slice matrix, rows x columns (seed 000 (B), seed 001).
MODEL_ROWS, MODEL_COLUMNS = 256, 224
MODEL_GRID = (MODEL_ROWS, MODEL_COLUMNS)


def to_model_grid(slices: np.ndarray | torch.Tensor, rows: int = MODEL_ROWS,
                  columns: int = MODEL_COLUMNS) -> torch.Tensor:
    """(N, R, C) or (N, K, R, C) slices -> the same on a rows x columns grid (bilinear)."""
    tensor = torch.as_tensor(slices, dtype=torch.float32)
    squeeze = tensor.ndim == 3
    if squeeze:
        tensor = tensor[:, None]
    out = F.interpolate(tensor, size=(rows, columns), mode="bilinear", align_corners=False)
    return out[:, 0] if squeeze else out


def mask_to_model_grid(mask: np.ndarray) -> np.ndarray:
    """A (slices, rows, columns) boolean mask on the model grid: the pixels whose bilinear
    resampling is at least half inside (the pipeline's head on the grid, and evaluation's)."""
    return to_model_grid(np.asarray(mask, np.float32)).numpy() >= 0.5


def _grid(rows: int, columns: int) -> sitk.Image:
    """A 2D image whose pixel centres sit at (i + 0.5) / n of a unit field of view."""
    image = sitk.Image(columns, rows, sitk.sitkFloat32)
    image.SetSpacing((1.0 / columns, 1.0 / rows))
    image.SetOrigin((0.5 / columns, 0.5 / rows))
    return image


def from_model_grid(slices: np.ndarray | torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """The inverse of :func:`to_model_grid`: (N, R', C') or (N, K, R', C') model-grid slices
    back to the original ``rows`` x ``columns``, with an interpolating cubic B-spline (it may
    overshoot at sharp edges by a few per cent; callers clip)."""
    array = torch.as_tensor(slices, dtype=torch.float32).numpy()
    leading = array.shape[:-2]
    flat = array.reshape((-1, *array.shape[-2:]))
    target = _grid(rows, columns)
    out = np.empty((len(flat), rows, columns), np.float32)
    for k, plane in enumerate(flat):
        image = sitk.GetImageFromArray(plane)
        image.CopyInformation(_grid(*plane.shape))
        out[k] = sitk.GetArrayFromImage(
            sitk.Resample(image, target, sitk.Transform(), sitk.sitkBSpline, 0.0,
                          sitk.sitkFloat32))
    return torch.from_numpy(out.reshape((*leading, rows, columns)))


#: A canvas at a fixed pixel spacing grows by multiples of this (pixels), so that every
#: architecture's downsampling divides it (pix2pix halves five times; MMgSN-Net twice).
PAD_MULTIPLE = 32


@dataclass(frozen=True)
class Placement:
    """Where one acquisition's slices lie on the network's canvas: the acquired matrix
    (``rows`` x ``columns``) resampled to ``inner`` pixels, centred on ``canvas`` (offsets
    may be negative where a fixed canvas is smaller than the field of view: cropped)."""

    rows: int
    columns: int
    inner: tuple[int, int]
    canvas: tuple[int, int]

    @property
    def offset(self) -> tuple[int, int]:
        """(top, left) of the resampled slice on the canvas."""
        return ((self.canvas[0] - self.inner[0]) // 2, (self.canvas[1] - self.inner[1]) // 2)


@dataclass(frozen=True)
class GridPolicy:
    """The grid a network runs on, as the checkpoint records it.

    ``spacing_mm`` None: the seeds' fixed matrix (seed 000 (B)): every slice stretched to
    ``rows`` x ``columns`` whatever its field of view (a 230 mm square field becomes 0.90 x
    1.03 mm pixels, a 320-matrix acquisition loses detail). A spacing: each slice resampled to
    square pixels of that size (mm), so the network's receptive field means the same
    millimetres at every site (issue 15, point 5), and centred on a ``rows`` x ``columns``
    canvas (the training set's widest field of view, in multiples of :data:`PAD_MULTIPLE`)
    that a wider field grows. Padding holds the normalised background."""

    rows: int = MODEL_ROWS
    columns: int = MODEL_COLUMNS
    spacing_mm: float | None = None

    def place(self, shape: tuple[int, ...], pixel_spacing: tuple[float, float],
              grow: bool = True) -> Placement:
        """Where slices of ``shape`` (..., rows, columns) with ``pixel_spacing`` (row,
        column; mm) go; ``grow`` False keeps the canvas and crops a wider field (training
        caches, whose slices must share one shape)."""
        rows, columns = int(shape[-2]), int(shape[-1])
        if self.spacing_mm is None:
            return Placement(rows, columns, (self.rows, self.columns), (self.rows, self.columns))
        inner = (max(1, round(rows * pixel_spacing[0] / self.spacing_mm)),
                 max(1, round(columns * pixel_spacing[1] / self.spacing_mm)))
        canvas = (self.rows, self.columns)
        if grow:
            canvas = (max(canvas[0], _multiple(inner[0])), max(canvas[1], _multiple(inner[1])))
        return Placement(rows, columns, inner, canvas)

    @staticmethod
    def fitting(spacing_mm: float, fields_mm: list[tuple[float, float]]) -> GridPolicy:
        """A fixed-spacing policy whose canvas holds every (rows, columns) field of view
        (mm) given: the training set's."""
        rows = max(_multiple(round(r / spacing_mm)) for r, _ in fields_mm)
        columns = max(_multiple(round(c / spacing_mm)) for _, c in fields_mm)
        return GridPolicy(rows, columns, float(spacing_mm))

    @property
    def canvas(self) -> tuple[int, int]:
        return (self.rows, self.columns)

    def describe(self) -> str:
        """E.g. '256 x 224 matrix' or '0.8 mm pixels on a 320 x 320 canvas'."""
        if self.spacing_mm is None:
            return f"{self.rows} x {self.columns} matrix"
        return f"{self.spacing_mm:g} mm pixels on a {self.rows} x {self.columns} canvas"


def _multiple(pixels: int) -> int:
    return int(math.ceil(pixels / PAD_MULTIPLE) * PAD_MULTIPLE)


def to_canvas(slices: np.ndarray | torch.Tensor, placement: Placement,
              fill: np.ndarray | float = 0.0) -> torch.Tensor:
    """(N, R, C) or (N, K, R, C) acquired slices onto the canvas: resampled to the placement's
    inner matrix (bilinear, as :func:`to_model_grid`) and centred; ``fill`` (a scalar, or one
    value per slice (N,) or per slice and channel (N, K)) outside the field of view."""
    inner = to_model_grid(slices, *placement.inner)
    if placement.inner == placement.canvas:
        return inner
    out = torch.empty((*inner.shape[:-2], *placement.canvas), dtype=torch.float32)
    out[...] = torch.as_tensor(np.asarray(fill, np.float32))[(...,) + (None,) * 2]
    top, left = placement.offset
    source = inner[..., max(0, -top):, max(0, -left):]
    target = out[..., max(0, top):, max(0, left):]
    rows = min(source.shape[-2], target.shape[-2])
    columns = min(source.shape[-1], target.shape[-1])
    target[..., :rows, :columns] = source[..., :rows, :columns]
    return out


def from_canvas(slices: np.ndarray | torch.Tensor, placement: Placement) -> torch.Tensor:
    """The inverse of :func:`to_canvas` (of a growing placement): the resampled slice cut out
    of the canvas and taken back to the acquired matrix (:func:`from_model_grid`)."""
    tensor = torch.as_tensor(slices, dtype=torch.float32)
    top, left = placement.offset
    inner = tensor[..., top:top + placement.inner[0], left:left + placement.inner[1]].contiguous()
    return from_model_grid(inner, placement.rows, placement.columns)


def mask_to_canvas(mask: np.ndarray, placement: Placement) -> np.ndarray:
    """:func:`mask_to_model_grid` for a canvas: pixels at least half inside."""
    return to_canvas(np.asarray(mask, np.float32), placement).numpy() >= 0.5


#: A head covers this fraction of the field of view at least; a triangle threshold that keeps
#: less has locked onto the wrong histogram peak (e.g. a T2w whose tissue peak dwarfs the
#: background's), and Otsu's threshold is used instead.
MIN_HEAD_FRACTION = 0.05


#: In-plane Gaussian smoothing (pixels) before thresholding: at a low-signal site (a 1.5 T
#: spin echo stored in a few hundred units) single noise voxels reach the triangle threshold
#: and the "head" took in most of the background (inst5: 0.47-0.81 of the field of view for
#: the T1w against 0.36-0.43 for the same head on the T2w); smoothed, both agree within 0.01.
SMOOTHING_PX = 1.0


def foreground(volume: np.ndarray) -> np.ndarray:
    """The head: voxels above the triangle threshold of the volume smoothed in plane
    (:data:`SMOOTHING_PX`; Otsu's threshold when the triangle keeps implausibly little), with
    each slice's holes (airways, sinuses, dark bone) filled, so only the background outside
    is dropped."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
    image = sitk.SmoothingRecursiveGaussian(
        image, [SMOOTHING_PX * s for s in image.GetSpacing()[:2]] + [1e-3])
    mask = sitk.TriangleThreshold(image, 0, 1, 256)
    if sitk.GetArrayViewFromImage(mask).mean() < MIN_HEAD_FRACTION:
        mask = sitk.OtsuThreshold(image, 0, 1, 256)
    filled = np.empty(volume.shape, bool)
    for k in range(volume.shape[0]):
        filled[k] = sitk.GetArrayFromImage(sitk.BinaryFillhole(mask[:, :, k])) > 0
    return filled


def clean_inputs(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                             dict[str, np.ndarray]]:
    """Head masks and background-free inputs (one grid, the T1w's), exactly as training and
    inference both need them: one function, so the two can never drift apart. The T1w and
    the T2w have their own head masks (a T2w without a usable one borrows the T1w's); other
    inputs (DWI, ADC: low resolution, distorted, whose foreground is not the head's outline)
    take the T1w's."""
    t1w = arrays["t1w"]
    masks = {"t1w": foreground(t1w)}
    for role, volume in arrays.items():
        if role == "t2w":
            masks[role] = foreground(volume)
            if not masks[role].any():
                masks[role] = masks["t1w"]
        elif role != "t1w":
            masks[role] = masks["t1w"]
    clean = {role: remove_background(volume, masks[role]) for role, volume in arrays.items()}
    return clean, masks


def clean_pair(t1w: np.ndarray, t2w: np.ndarray) -> tuple[dict[str, np.ndarray],
                                                           dict[str, np.ndarray]]:
    """:func:`clean_inputs` of a T1w and a T2w."""
    return clean_inputs({"t1w": t1w, "t2w": t2w})


def remove_background(volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Zero the background noise outside the head (triangle thresholding, seed 000 (C))."""
    if mask is None:
        mask = foreground(volume)
    return np.where(mask, volume, 0.0).astype(np.float32)
