"""The synthetic CE-MRI series: MR Image Storage, one instance per T1w slice, in the T1w's
geometry and frame of reference, labelled synthetic everywhere a viewer or TPS looks.

- ImageType DERIVED\\SECONDARY\\OTHER, SyntheticData YES, a series description that says
  SYNTHETIC, DerivationDescription and DerivationCodeSequence (DCM 123110 Artificial
  Intelligence), vcemri as Synthesizing Equipment, Source Image Sequence naming the T1w slice
  and the slices of each other input (T2w, DWI, ...) it was computed from (all through
  ``synthesis.MRImage``, the one DICOM writer the simulator uses too);
- no contrast agent attribute (nothing was injected);
- pixels in the T1w's scanner units (the T1w's RescaleSlope/Intercept when it has them);
- optional "SYNTHETIC" burned into the pixels, with BurnedInAnnotation to match;
- the verdict (planning.verdict) in every image's ImageComments.
"""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset

import synthesis
from config import PlanningSettings

from .identity import Supersedes, described, output_uid, result_key

if TYPE_CHECKING:
    from synthesis import SynthesisResult

    from .verdict import Verdict

#: MR acquisition attributes copied from the T1w the synthetic image imitates.
MR_COPIED = ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType",
             "SequenceName", "RepetitionTime", "EchoTime", "EchoTrainLength", "FlipAngle",
             "MagneticFieldStrength", "ImagingFrequency", "ImagedNucleus", "SliceThickness",
             "PatientPosition", "BodyPartExamined")


def _sources_near(volume: synthesis.Volume, position: float,
                  normal: np.ndarray) -> list[synthesis.SourceInstance]:
    """The slices of an input (T2w, DWI, ...) within one of its slice spacings of a T1w slice
    position, measured along the T1w's normal (the input may be another plane); the nearest
    one at least."""
    sources = [s for s in volume.sources if s.origin_mm is not None]
    if not sources:
        return list(volume.sources[:1])
    along = np.array([float(np.dot(s.origin_mm, normal)) for s in sources])
    if len(sources) < 2:
        return sources
    spacing = abs(float(np.median(np.diff(np.sort(along))))) or 1.0
    near = [s for s, a in zip(sources, along, strict=True) if abs(a - position) < spacing]
    return near or [sources[int(np.argmin(np.abs(along - position)))]]


#: The model inputs every earlier synthetic series came from; other inputs are named in the
#: series description.
USUAL_INPUTS = ("t1w", "t2w")


def pixel_storage(values: np.ndarray, t1w_header: Dataset) -> synthesis.PixelStorage:
    """How the synthetic series stores ``values`` (scanner units) as unsigned 16 bits.

    The T1w's own RescaleSlope/Intercept when it has them (top level, or a multi-frame file's
    shared or first per-frame pixel value transformation: Enhanced MR keeps them there);
    otherwise the T1w stored its scanner units as integers and so do we, unless they would not
    fit 16 bits, when a slope spreads the range over them."""
    candidates = [t1w_header]
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in (t1w_header.get(groups) or [])[:1]:
            candidates += list(group.get("PixelValueTransformationSequence") or [])
    for source in candidates:
        if "RescaleSlope" in source:
            return synthesis.PixelStorage(rescale=(
                float(source.RescaleSlope or 1.0), float(source.get("RescaleIntercept", 0) or 0)))
    top = float(values.max()) if values.size else 0.0
    return synthesis.PixelStorage(rescale=None if top <= 65535 else (top / 65000.0, 0.0))


def _burn_in(pixels: np.ndarray, value: int) -> np.ndarray:
    """'SYNTHETIC' in the top-left corner, scaled to about a quarter of the image width."""
    text = Image.new("L", (60, 12), 0)
    ImageDraw.Draw(text).text((1, 0), "SYNTHETIC", fill=255)
    width = max(24, pixels.shape[1] // 4)
    mark = np.asarray(text.resize((width, max(5, width // 5)), Image.Resampling.NEAREST)) > 127
    out = pixels.copy()
    out[2:2 + mark.shape[0], 2:2 + mark.shape[1]][mark] = value
    return out


def synthetic_series(result: SynthesisResult, t1w_header: Dataset,
                     settings: PlanningSettings, verdict: Verdict,
                     supersedes: Supersedes | None = None) -> list[synthesis.MRImage]:
    """The synthetic series' datasets, ascending along the slice normal; every image's
    ImageComments states the ``verdict``, and, when ``supersedes`` names an earlier series
    (of other input content; the caller drops it for the same content), the description,
    derivation and comments say it replaces it."""
    image = result.vce.image
    values = sitk.GetArrayFromImage(image)
    storage = pixel_storage(values, t1w_header)
    stored = storage.store(values)
    direction = np.reshape(image.GetDirection(), (3, 3))
    orientation = (*direction[:, 0], *direction[:, 1])
    normal = direction[:, 2]
    spacing = image.GetSpacing()
    key = result_key(result)
    model = str(result.model.get("architecture", "model"))
    series_uid = output_uid(key, "series")
    number = int(t1w_header.get("SeriesNumber", 0) or 0) + settings.series_number_offset
    description = settings.series_description.replace("{model}", model)
    if "SYNTHETIC" not in description.upper():
        description = f"SYNTHETIC {description}"
    if tuple(result.inputs) not in ((), USUAL_INPUTS):
        description = f"{description} from {result.input_line}"
    description = described(description, supersedes)
    where = (result.institution.institution
             or f"external, closest {result.institution.closest}")
    used = result.input_line or "T1w + T2w"
    derivation = (f"Synthetic contrast-enhanced T1w computed by {model} from the {used} "
                  f"series; no contrast agent was given. {result.edm.line()}; "
                  f"institution {where}")
    if supersedes is not None:
        derivation = f"{derivation}. {supersedes.sentence()}"
    equipment = synthesis.synthesizing_equipment(model)
    attributes = {k: t1w_header.data_element(k).value for k in MR_COPIED if k in t1w_header}
    attributes["WindowCenterWidthExplanation"] = "synthetic CE-T1w"
    attributes["ImageComments"] = " ".join(
        ("SYNTHETIC (no contrast agent given).", f"Verdict: {verdict.line()}",
         *([supersedes.sentence()] if supersedes else ())))
    window = synthesis.display_window(values)
    created = _dt.datetime.now()
    datasets = []
    for k in range(values.shape[0]):
        position = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, k)))
        t1_source = result.t1w.sources[k]
        # the T1w always (its grid, head and scaling are the output's), then what the
        # network read besides
        along = float(np.dot(position, normal))
        sources = [t1_source]
        for role, volume in (result.inputs or {"t2w": result.t2w}).items():
            if role != "t1w" and volume is not None:
                sources += _sources_near(volume, along, normal)
        pixels = stored[k]
        if settings.burn_in_marker:
            pixels = _burn_in(pixels, int(stored.max()) or 1)
        datasets.append(synthesis.MRImage.from_ref_dataset(
            t1w_header,
            pixels=pixels,
            plane=synthesis.ImagePlane(
                position_mm=tuple(position), orientation=orientation,
                pixel_spacing_mm=(spacing[1], spacing[0]),
                spacing_between_slices_mm=spacing[2]),
            storage=storage,
            series_instance_uid=series_uid, series_number=number,
            sop_instance_uid=output_uid(key, "instance", k), instance_number=k + 1,
            frame_of_reference_uid=result.t1w.info.frame_of_reference_uid,
            position_reference_indicator=t1w_header.get("PositionReferenceIndicator", ""),
            manufacturer=synthesis.MANUFACTURER,
            manufacturer_model_name=f"vcemri {model}"[:64],
            software_versions=synthesis.software_version(),
            series_description=description,
            attributes=attributes,
            synthetic=synthesis.Synthetic(equipment, synthesis.Derivation(
                derivation, sources=tuple(synthesis.SourceImage(
                    s.sop_class_uid, s.sop_instance_uid, s.frame) for s in sources))),
            window=window, created=created,
            burned_in_annotation=settings.burn_in_marker))
    return datasets
