"""Writing everything for the TPS from one synthesis result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image
from pydicom.dataset import Dataset

from config import PlanningSettings

from .helpers import helper_regions
from .review import montage, review_slice, secondary_capture
from .rtstruct import rtstruct
from .synthetic_series import result_key, synthetic_series

if TYPE_CHECKING:
    from synthesis import SynthesisResult


@dataclass
class PlanningOutputs:
    """Paths of what was written, and notes (e.g. helpers omitted because empty)."""

    series: list[Path]
    rtstruct: Path | None
    review_dicom: Path
    review_png: Path
    notes: list[str] = field(default_factory=list)

    def files(self) -> list[Path]:
        """Every DICOM file, in sending order (images before what references them)."""
        return [*self.series, *([self.rtstruct] if self.rtstruct else []), self.review_dicom]


def write_outputs(result: SynthesisResult, t1w_header: Dataset, out: Path,
                  settings: PlanningSettings) -> PlanningOutputs:
    """Synthetic series in ``out/synthetic``, ``rtstruct.dcm``, ``review.dcm``, ``review.png``."""
    datasets = synthetic_series(result, t1w_header, settings)
    folder = out / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    series_paths = []
    for ds in datasets:
        path = folder / f"{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        series_paths.append(path)
    helpers, notes = helper_regions(result, settings)
    key = result_key(result)
    structure_path = None
    if helpers:
        structure_path = out / "rtstruct.dcm"
        rtstruct(helpers, datasets, key, notes).save_as(structure_path, enforce_file_format=True)
    else:
        notes.append("no RTSTRUCT written: every helper was empty")
    rgb = montage(result, helpers, review_slice(helpers, len(datasets)))
    png = out / "review.png"
    Image.fromarray(rgb).save(png)
    review = out / "review.dcm"
    secondary_capture(rgb, t1w_header, key, int(datasets[0].SeriesNumber) + 2,
                      str(result.model.get("architecture", "model"))).save_as(review)
    return PlanningOutputs(series_paths, structure_path, review, png, notes)
