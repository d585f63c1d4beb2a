"""The review image: one PNG montage for people and the same as a DICOM Secondary Capture
(highdicom) in the study, for PACS viewers.

Panels at the slice where the enhancement helper is largest (else the middle slice): T1w,
T2w, synthetic CE-T1w, confidence, and the synthetic CE-T1w with the helper contours; each
panel at the slice's physical aspect ratio. The caption says SYNTHETIC, the verdict, the
institution decision and the EDM factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset

import synthesis

from .helpers import Helper
from .identity import output_uid

if TYPE_CHECKING:
    from synthesis import SynthesisResult

    from .verdict import Verdict

PANEL_HEIGHT = 256
#: Caption colour of each verdict state.
VERDICT_COLOURS = {"accepted": "white", "accepted with low-confidence regions": "orange",
                   "refused": "red"}
CAPTION_LINES = 4
LINE = 14


def _grey(image: np.ndarray, low: float | None = None, high: float | None = None) -> Image.Image:
    values = image[image > 0]
    if low is None or high is None:
        low, high = (np.percentile(values, [1.0, 99.5]) if values.size else (0.0, 1.0))
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255
    return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")


def _edges(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
                         & mask[1:-1, :-2] & mask[1:-1, 2:])
    edge = mask & ~inner
    edge[1:] |= edge[:-1]
    edge[:, 1:] |= edge[:, :-1]
    return edge


def review_slice(helpers: Sequence[Helper], slices: int) -> int:
    """The slice shown: largest enhancement helper area, else the middle."""
    for helper in helpers:
        if helper.name.endswith("Enhancement"):
            return int(np.argmax(helper.mask.reshape(slices, -1).sum(1)))
    return slices // 2


def montage(result: SynthesisResult, helpers: Sequence[Helper], k: int,
            verdict: Verdict) -> np.ndarray:
    """The review montage as an RGB array, its caption stating the verdict."""
    spacing = result.vce.image.GetSpacing()
    vce = sitk.GetArrayFromImage(result.vce.image)[k]
    rows, columns = vce.shape
    width = max(1, round(PANEL_HEIGHT * columns * spacing[0] / (rows * spacing[1])))
    t1w = np.asarray(result.t1w.array)[k]
    head = (sitk.GetArrayFromImage(result.foreground)[k] > 0 if result.foreground is not None
            else vce > 0)
    # T1w and VCE share the T1w's window, with headroom, so enhancement shows as brightening.
    low, high = np.percentile(t1w[head], [1.0, 99.5]) if head.any() else (0.0, 1.0)
    shared = (float(low), float(low + 1.3 * (high - low)))
    panels = [("T1w", _grey(t1w, *shared))]
    for role, volume in (result.inputs or {"t2w": result.t2w}).items():
        if role != "t1w" and volume is not None:
            panels.append((synthesis.INPUT_NAMES.get(role, role),
                           _grey(np.asarray(volume.array)[k])))
    panels.append(("VCE (SYNTHETIC)", _grey(vce, *shared)))
    if result.confidence is not None:
        confidence = sitk.GetArrayFromImage(result.confidence)[k] * head
        panels.append(("confidence", _grey(confidence, 0.0, 1.0)))
    overlay = np.asarray(_grey(vce, *shared)).copy()
    for helper in helpers:
        overlay[_edges(helper.mask[k])] = helper.colour
    panels.append(("VCE + helpers", Image.fromarray(overlay)))

    caption = CAPTION_LINES * LINE + 6
    sheet = Image.new("RGB", (width * len(panels), PANEL_HEIGHT + LINE + caption), "black")
    draw = ImageDraw.Draw(sheet)
    for j, (title, panel) in enumerate(panels):
        sheet.paste(panel.resize((width, PANEL_HEIGHT), Image.Resampling.BILINEAR),
                    (j * width, LINE))
        draw.text((j * width + 3, 1), title, fill="white")
    decision = result.institution
    where = (f"institution {decision.institution}" if decision.known else
             f"external institution (closest {decision.closest})")
    lines = [
        "SYNTHETIC contrast-enhanced T1w (VCE-MRI): no contrast agent was given; "
        "not for diagnosis without review",
        f"verdict: {verdict.line()}",
        f"{where}, confidence {decision.confidence:.2f}; {result.edm.line()}; model "
        f"{result.model.get('architecture')} from {result.input_line or 'T1w + T2w'}",
        f"slice {k + 1}/{result.vce.shape[0]}; helpers: "
        + (", ".join(h.name for h in helpers) or "none"),
    ]
    for i, line in enumerate(lines):
        colour = {0: "yellow", 1: VERDICT_COLOURS.get(verdict.state, "white")}.get(i, "white")
        draw.text((4, PANEL_HEIGHT + LINE + 3 + i * LINE), line, fill=colour)
    return np.asarray(sheet)


def notice(lines: Sequence[str], width: int = 900) -> np.ndarray:
    """Text on a black page, as an RGB array (a refusal notice for the TPS)."""
    sheet = Image.new("RGB", (width, LINE * (len(lines) + 2)), "black")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(lines):
        draw.text((8, LINE * (i + 1)), line, fill="red" if i == 0 else "white")
    return np.asarray(sheet)


def secondary_capture(rgb: np.ndarray, t1w_header: Dataset, key: str,
                      series_number: int, model: str,
                      description: str = "VCE review (SYNTHETIC)") -> hd.sc.SCImage:
    """The montage (or a notice) as a DICOM Secondary Capture in the T1w's study."""
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=t1w_header,
        pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=output_uid(key, "review-series"),
        series_number=series_number,
        sop_instance_uid=output_uid(key, "review"),
        instance_number=1,
        manufacturer=synthesis.MANUFACTURER,
        patient_orientation=("L", "P"),
        series_description=description,
    )
    image.BurnedInAnnotation = "YES"
    if "Laterality" not in image:
        image.Laterality = ""  # General Series type 2C; head and neck is not a paired part
    image.SyntheticData = "YES"
    image.ContributingEquipmentSequence = [synthesis.synthesizing_equipment(model)]
    return image
