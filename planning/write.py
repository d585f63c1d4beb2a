"""Writing everything for the TPS from one synthesis result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from pydicom.dataset import Dataset

import synthesis
from config import PlanningSettings

from .helpers import helper_regions
from .identity import Supersedes, described, output_uid, result_key
from .review import montage, notice, review_slice, secondary_capture
from .rtstruct import RTStructureSet
from .synthetic_series import synthetic_series
from .verdict import Verdict, verdict_of

if TYPE_CHECKING:
    from synthesis import SynthesisResult, Volume, WrittenObject


@dataclass
class PlanningOutputs:
    """What was written (UIDs, SOP classes, paths) and notes (e.g. helpers omitted because
    empty)."""

    series: list[WrittenObject]
    rtstruct: WrittenObject | None
    review: WrittenObject
    review_png: Path
    verdict: Verdict
    notes: list[str] = field(default_factory=list)
    #: the earlier synthetic series these objects replace, when they do
    supersedes: Supersedes | None = None

    def objects(self) -> list[WrittenObject]:
        """Every DICOM object, in sending order: the images before what references them."""
        return [*self.series, *([self.rtstruct] if self.rtstruct else []), self.review]


def write_outputs(result: SynthesisResult, t1w_header: Dataset, out: Path,
                  settings: PlanningSettings,
                  supersedes: Supersedes | None = None) -> PlanningOutputs:
    """Synthetic series in ``out/synthetic``, ``rtstruct.dcm``, ``review.dcm``, ``review.png``,
    each stating the verdict; the series and the RTSTRUCT say which earlier synthetic series
    they replace (``supersedes``, when the input changed since it was sent)."""
    key = result_key(result)
    if supersedes is not None and supersedes.series_uid == output_uid(key, "series"):
        supersedes = None  # the same content and model: these are the same objects again
    helpers, notes = helper_regions(result, settings)
    verdict = verdict_of(result, helpers, settings.helper_prefix)
    datasets = synthetic_series(result, t1w_header, settings, verdict, supersedes)
    series = synthesis.write_series(datasets, out / "synthetic")
    structure = None
    if helpers:
        structure = synthesis.write_object(RTStructureSet(
            datasets, helpers,
            series_instance_uid=output_uid(key, "rtstruct-series"),
            series_number=int(datasets[0].SeriesNumber) + 1,
            sop_instance_uid=output_uid(key, "rtstruct"),
            label="VCE helpers", name="SYNTHETIC helpers",
            description=(f"{supersedes.sentence()} " if supersedes else "")
                        + "Helper contours from a synthetic contrast-enhanced T1w; not a "
                        f"delineation. Verdict: {verdict.line()}. " + "; ".join(notes),
            series_description=described("VCE helper contours (SYNTHETIC)", supersedes),
            manufacturer=synthesis.MANUFACTURER, manufacturer_model_name="vcemri helpers",
            software_versions=synthesis.software_version(),
            roi_description="vcemri helper from synthetic CE-T1w"), out / "rtstruct.dcm")
    else:
        notes.append("no RTSTRUCT written: every helper was empty")
    if supersedes is not None:
        notes.append(supersedes.sentence())
    rgb = montage(result, helpers, review_slice(helpers, len(datasets)), verdict)
    png = out / "review.png"
    Image.fromarray(rgb).save(png)
    review = synthesis.write_object(
        secondary_capture(rgb, t1w_header, key, int(datasets[0].SeriesNumber) + 2,
                          str(result.model.get("architecture", "model"))),
        out / "review.dcm")
    return PlanningOutputs(series, structure, review, png, verdict, notes, supersedes)


def refusal_notice(t1w_header: Dataset, t1w: Volume, t2w: Volume | None, model: dict[str, Any],
                   verdict: Verdict, path: Path) -> WrittenObject:
    """A Secondary Capture in the T1w's study that says synthesis was refused and why, for a
    TPS whose users should know that no synthetic series will come."""
    lines = ["vcemri: NO SYNTHETIC CONTRAST-ENHANCED SERIES for this study",
             f"the T1w (series {t1w_header.get('SeriesNumber', '?')})"
             f"{'' if t2w is None else ' and T2w'} were refused "
             f"by screening for model {model.get('architecture')}:",
             *[f"- {reason}"[:150] for reason in verdict.reasons],
             "Nothing synthetic was sent; the received series are kept on the node."]
    key = "|".join(("refusal", t1w.digest(), *(() if t2w is None else (t2w.digest(),)),
                     str(model.get("weights_sha256"))))
    number = int(t1w_header.get("SeriesNumber", 0) or 0) + 1002
    capture = secondary_capture(notice(lines), t1w_header, key, max(number, 1),
                                str(model.get("architecture", "model")),
                                description="VCE REFUSED: no synthetic series")
    return synthesis.write_object(capture, path)
