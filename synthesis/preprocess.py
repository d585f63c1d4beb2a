"""Preprocessing as seed 000 describes it: each axial slice resampled to the model's
256 x 224 matrix (bilinear) and back, and triangle thresholding against background noise.

The slice resampling maps pixel centres with half-pixel alignment (``align_corners=False``):
pixel i of n rows sits at (i + 0.5) / n of the field of view in both grids, so resampling to
the model grid and back returns every structure to where it was (within half a voxel); the
way back is the exact inverse mapping, not a restoration of the detail the smaller grid lost.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

#: The model's slice matrix, rows x columns (seed 000 (B), seed 001).
MODEL_ROWS, MODEL_COLUMNS = 256, 224


def to_model_grid(slices: np.ndarray | torch.Tensor, rows: int = MODEL_ROWS,
                  columns: int = MODEL_COLUMNS) -> torch.Tensor:
    """(N, R, C) or (N, K, R, C) slices -> the same on a rows x columns grid (bilinear)."""
    tensor = torch.as_tensor(slices, dtype=torch.float32)
    squeeze = tensor.ndim == 3
    if squeeze:
        tensor = tensor[:, None]
    out = F.interpolate(tensor, size=(rows, columns), mode="bilinear", align_corners=False)
    return out[:, 0] if squeeze else out


def from_model_grid(slices: np.ndarray | torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """The inverse of :func:`to_model_grid`: back to the original ``rows`` x ``columns``."""
    return to_model_grid(slices, rows, columns)


#: A head covers this fraction of the field of view at least; a triangle threshold that keeps
#: less has locked onto the wrong histogram peak (e.g. a T2w whose tissue peak dwarfs the
#: background's), and Otsu's threshold is used instead.
MIN_HEAD_FRACTION = 0.05


def foreground(volume: np.ndarray) -> np.ndarray:
    """The head: voxels above the volume's triangle threshold (Otsu's when the triangle
    keeps implausibly little), with each slice's holes (airways, sinuses, dark bone)
    filled, so only the background outside is dropped."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
    mask = sitk.TriangleThreshold(image, 0, 1, 256)
    if sitk.GetArrayViewFromImage(mask).mean() < MIN_HEAD_FRACTION:
        mask = sitk.OtsuThreshold(image, 0, 1, 256)
    filled = np.empty(volume.shape, bool)
    for k in range(volume.shape[0]):
        filled[k] = sitk.GetArrayFromImage(sitk.BinaryFillhole(mask[:, :, k])) > 0
    return filled


def clean_pair(t1w: np.ndarray, t2w: np.ndarray) -> tuple[dict[str, np.ndarray],
                                                           dict[str, np.ndarray]]:
    """Head masks and background-free T1w and T2w (on one grid), exactly as training and
    inference both need them: one function, so the two can never drift apart. A T2w without
    a usable head mask borrows the T1w's."""
    masks = {"t1w": foreground(t1w), "t2w": foreground(t2w)}
    if not masks["t2w"].any():
        masks["t2w"] = masks["t1w"]
    clean = {"t1w": remove_background(t1w, masks["t1w"]),
             "t2w": remove_background(t2w, masks["t2w"])}
    return clean, masks


def remove_background(volume: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Zero the background noise outside the head (triangle thresholding, seed 000 (C))."""
    if mask is None:
        mask = foreground(volume)
    return np.where(mask, volume, 0.0).astype(np.float32)
