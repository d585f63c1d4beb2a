"""The cohort preview: one row per institution with T1w, T2w, CE-T1w and the CE-T1w with the
ground-truth tumour outline, at the slice where the tumour is largest."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .record import PatientRecord

TILE = 220
CAPTION = 18
COLUMNS = ("T1w", "T2w", "CE-T1w", "CE-T1w + tumour")


def _grey(image: np.ndarray) -> Image.Image:
    """Window at the 1st-99.5th percentiles of the head, as a viewer's auto window would."""
    values = image[image > np.percentile(image, 20)]
    low, high = (np.percentile(values, [1.0, 99.5]) if values.size else (0.0, 1.0))
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255
    return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")


def _fit(tile: Image.Image, resample: Image.Resampling = Image.Resampling.BILINEAR) -> Image.Image:
    """Scale to fit a TILE x TILE square (keeping the aspect ratio), centred on black."""
    factor = TILE / max(tile.width, tile.height)
    size = (max(1, round(tile.width * factor)), max(1, round(tile.height * factor)))
    canvas = Image.new(tile.mode, (TILE, TILE))
    canvas.paste(tile.resize(size, resample), ((TILE - size[0]) // 2, (TILE - size[1]) // 2))
    return canvas


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
                         & mask[1:-1, :-2] & mask[1:-1, 2:])
    return mask & ~inner


def write_preview(path: Path, records: Sequence[PatientRecord]) -> None:
    """Write the montage PNG for records that carry preview slices."""
    rows = [r for r in records if r.preview is not None]
    sheet = Image.new("RGB", (TILE * len(COLUMNS), (TILE + CAPTION) * max(len(rows), 1) + CAPTION),
                      "black")
    draw = ImageDraw.Draw(sheet)
    for j, title in enumerate(COLUMNS):
        draw.text((j * TILE + 4, 2), title, fill="white")
    for i, record in enumerate(rows):
        assert record.preview is not None
        top = CAPTION + i * (TILE + CAPTION)
        draw.text((4, top + 2), f"{record.institution} {record.patient}: tumour "
                  f"{record.tumour_volume_ml:.1f} ml", fill="yellow")
        tiles = [_fit(_grey(np.asarray(record.preview[k], np.float32)))
                 for k in ("t1w", "t2w", "ce")]
        # The outline is drawn after scaling, two pixels wide, so it stays visible.
        mask = Image.fromarray((np.asarray(record.preview["mask"]) > 0.5).astype(np.uint8) * 255)
        inside = np.asarray(_fit(mask, Image.Resampling.NEAREST)) > 127
        edge = _outline(inside)
        edge[1:] |= edge[:-1]
        edge[:, 1:] |= edge[:, :-1]
        pixels = np.asarray(tiles[2]).copy()
        pixels[edge] = (255, 40, 40)
        tiles.append(Image.fromarray(pixels))
        for j, tile in enumerate(tiles):
            sheet.paste(tile, (j * TILE, top + CAPTION))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
