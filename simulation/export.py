"""Writing a simulated patient as real DICOM: MR Image Storage series (T1w, T2w, CE-T1w and,
opt-in, DWI and ADC) through ``synthesis``'s DICOM writer (the one planning uses too), the
ground-truth tumour as DICOM SEG (highdicom) and NIfTI (SimpleITK).

Every UID is derived from the cohort seed, the institution and the patient, and every date from
the simulated study's, so the same seed writes the same files. Simulated images say what they
are: SyntheticData YES with the simulator as Synthesizing Equipment, patient names SIM^..., an
institution name that starts with "Simulated", "(simulated)" in the study description and the
simulator in SoftwareVersions. Everything else imitates the site's scanner (manufacturer,
model, station, sequences, scaling), since institution classification reads those.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import MRImageStorage

import synthesis

from . import diffusion
from .acquisition import Geometry, Protocol
from .diffusion import Diffusion
from .sites import DiffusionRole, PulseSequence, Role, Site

SOFTWARE = "vcemri simulator"

#: Series numbers as a scanner would number a head-and-neck exam.
SERIES_NUMBERS: dict[Role, int] = {"t1w": 3, "t2w": 4, "ce": 7}

#: Gd-DOTA, 0.1 mmol/kg (seed 000 Table 1); 0.5 mmol/ml, 279.3 mg/ml gadoterate meglumine.
GD_MMOL_PER_KG = 0.1
GD_MMOL_PER_ML = 0.5

#: Minutes after the start of the study at which each series is acquired.
ACQUIRED_MIN: dict[Role, int] = {"t1w": 5, "t2w": 10, "ce": 25}

#: The opt-in diffusion series (simulation/diffusion.py): acquired before the contrast agent.
DIFFUSION_SERIES_NUMBERS: dict[DiffusionRole, int] = {"dwi": 5, "adc": 6}
DIFFUSION_ACQUIRED_MIN = 15
#: How the scanner derived the ADC map (DCM 113041, CID 7203 Image Derivation).
ADC_DERIVATION = hd.sr.CodedConcept.from_code(codes.DCM.ApparentDiffusionCoefficient)


@dataclass(frozen=True)
class PatientInfo:
    """Patient- and study-level identity of a simulated patient (all simulated)."""

    patient_id: str
    patient_name: str
    sex: str
    age_years: int
    weight_kg: float
    study_uid: str
    frame_of_reference_uid: str
    study_datetime: _dt.datetime
    uid_seed: str  # entropy for every further UID of this patient

    def uid(self, *parts: object) -> str:
        """A UID derived from this patient and ``parts`` (deterministic)."""
        return synthesis.derived_uid(self.uid_seed, *parts)


def storage(site: Site) -> synthesis.PixelStorage:
    """How the site's scanner stores its pixels (bit depth, sign, RescaleSlope/Intercept)."""
    return synthesis.PixelStorage(bits_stored=site.bits_stored,
                                  signed=site.pixel_representation == 1, rescale=site.rescale)


def _attributes(site: Site, role: Role | DiffusionRole, protocol: Protocol,
                moment: _dt.datetime, info: PatientInfo,
                sequence: PulseSequence | None = None) -> dict[str, object]:
    """What a scanner writes for this series beyond the image itself: patient study, protocol
    and MR acquisition attributes, the contrast agent of the CE series, and a note that the
    patient is simulated. ``sequence`` defaults to the site's for ``role``."""
    sequence = sequence or site.sequence(role)  # type: ignore[arg-type]
    date, time = moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")
    values: dict[str, object] = {
        "PatientAge": f"{info.age_years:03d}Y", "PatientWeight": round(info.weight_kg, 1),
        "StudyDescription": "HEAD NECK NPC (simulated)",
        "ImageComments": f"Simulated by the vcemri simulator ({site.title}): a digital "
                         "head-and-neck phantom, not a patient",
        "ProtocolName": sequence.description, "AcquisitionDate": date,
        "AcquisitionTime": time, "BodyPartExamined": "HEADNECK", "PatientPosition": "HFS",
        "AcquisitionNumber": 1,
        "ScanningSequence": sequence.scanning_sequence.split("\\"),
        "SequenceVariant": sequence.sequence_variant.split("\\"),
        "ScanOptions": sequence.scan_options,
        "MRAcquisitionType": sequence.acquisition, "SequenceName": sequence.sequence_name,
        "RepetitionTime": round(protocol.tr_ms, 2), "EchoTime": round(protocol.te_ms, 2),
        "EchoTrainLength": sequence.echo_train_length,
    }
    if sequence.ti_ms is not None:
        values["InversionTime"] = sequence.ti_ms
    values.update(FlipAngle=sequence.flip_deg, MagneticFieldStrength=site.field_t,
                  ImagingFrequency=round(42.577478 * site.field_t, 6), ImagedNucleus="1H",
                  NumberOfAverages=1)
    if role == "ce":
        volume_ml = round(info.weight_kg * GD_MMOL_PER_KG / GD_MMOL_PER_ML, 1)
        values.update(ContrastBolusAgent="Gd-DOTA (gadoterate meglumine) 0.1 mmol/kg",
                      ContrastBolusRoute="IV", ContrastBolusVolume=volume_ml,
                      ContrastBolusTotalDose=volume_ml, ContrastBolusIngredient="GADOLINIUM",
                      ContrastBolusIngredientConcentration=279.3)
    return values


def series_datasets(
    volume: np.ndarray,
    geometry: Geometry,
    site: Site,
    role: Role,
    protocol: Protocol,
    info: PatientInfo,
) -> list[synthesis.MRImage]:
    """One MR Image Storage dataset per slice, in the site's instance order."""
    stored_as = storage(site)
    stored = stored_as.store(volume)
    window = synthesis.display_window(stored_as.values(stored))
    moment = info.study_datetime + _dt.timedelta(minutes=ACQUIRED_MIN[role])
    attributes = _attributes(site, role, protocol, moment, info)
    simulated = synthesis.Synthetic(synthesis.synthesizing_equipment(SOFTWARE))
    return [
        _image(stored[k], k, geometry, site, info, stored_as, series=role,
               series_number=SERIES_NUMBERS[role], sop_instance_uid=info.uid("instance", role, k),
               instance_number=number, description=site.sequence(role).description,
               attributes=attributes, synthetic=simulated, window=window, moment=moment)
        for number, k in enumerate(_slice_order(geometry, site), start=1)
    ]


def _slice_order(geometry: Geometry, site: Site) -> range:
    """Slice indices (ascending along the normal) in the site's instance order."""
    if site.slice_order == "descending":
        return range(geometry.slices - 1, -1, -1)
    return range(geometry.slices)


def _image(pixels: np.ndarray, k: int, geometry: Geometry, site: Site, info: PatientInfo,
           stored_as: synthesis.PixelStorage, *, series: str, series_number: int,
           sop_instance_uid: str, instance_number: int, description: str,
           attributes: dict[str, object], synthetic: synthesis.Synthetic,
           window: tuple[float, float] | None, moment: _dt.datetime) -> synthesis.MRImage:
    """Slice ``k`` of a simulated series (``series`` names its SeriesInstanceUID)."""
    return synthesis.MRImage(
        pixels=pixels,
        plane=synthesis.ImagePlane(
            position_mm=tuple(float(v) for v in geometry.positions[k]),
            orientation=tuple(geometry.orientation),
            pixel_spacing_mm=(geometry.row_spacing_mm, geometry.column_spacing_mm),
            slice_thickness_mm=geometry.slice_thickness_mm,
            spacing_between_slices_mm=geometry.slice_spacing_mm),
        storage=stored_as,
        study_instance_uid=info.study_uid,
        series_instance_uid=info.uid("series", series),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        frame_of_reference_uid=info.frame_of_reference_uid,
        manufacturer=site.manufacturer,
        manufacturer_model_name=site.model,
        software_versions=SOFTWARE,
        institution_name=site.institution_name,
        device_serial_number=f"SIM{site.key.upper()}",
        station_name=site.station_name,
        series_description=description,
        attributes=attributes,
        synthetic=synthetic,
        window=window,
        created=moment,
        patient_id=info.patient_id, patient_name=info.patient_name,
        patient_sex=info.sex, study_date=info.study_datetime.strftime("%Y%m%d"),
        study_time=info.study_datetime.strftime("%H%M%S"), study_id="SIM",
        accession_number="", referring_physician_name="",
    )


def diffusion_datasets(dwi: Diffusion, site: Site,
                       info: PatientInfo) -> dict[DiffusionRole, list[synthesis.MRImage]]:
    """The DWI series (both b-values: every slice at b = 0, then every slice at b = 1000, in
    the site's slice order, InstanceNumber 1..2N) and the ADC series the scanner derives from
    it (in 1e-6 mm^2/s), as MR Image Storage instances labelled simulated like the others."""
    geometry, seq = dwi.geometry, diffusion.sequence(site)
    moment = info.study_datetime + _dt.timedelta(minutes=DIFFUSION_ACQUIRED_MIN)
    protocol = Protocol(dwi.protocol.tr_ms, dwi.protocol.te_ms)
    common = _attributes(site, "dwi", protocol, moment, info, sequence=seq)
    common.update(ScanningSequence=["SE", "EP"], SequenceVariant=["SK", "SP"],
                  InPlanePhaseEncodingDirection="COL")
    simulated = synthesis.Synthetic(synthesis.synthesizing_equipment(SOFTWARE))
    stored_as = storage(site)
    order = _slice_order(geometry, site)
    images: list[synthesis.MRImage] = []
    sources: dict[int, list[synthesis.SourceImage]] = {k: [] for k in order}
    for step, (b, volume) in enumerate(zip(diffusion.B_VALUES, (dwi.b0, dwi.b1000),
                                           strict=True)):
        stored = stored_as.store(volume)
        window = synthesis.display_window(stored_as.values(stored))
        attributes = common | {
            "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW" if b else "NONE"],
            "SequenceName": f"{seq.sequence_name}{b}{'t' if b else ''}",
            "DiffusionBValue": float(b),
            "DiffusionDirectionality": "ISOTROPIC" if b else "NONE",
        }
        for number, k in enumerate(order, start=1 + step * geometry.slices):
            uid = info.uid("instance", "dwi", b, k)
            sources[k].append(synthesis.SourceImage(MRImageStorage, uid))
            images.append(_image(
                stored[k], k, geometry, site, info, stored_as, series="dwi",
                series_number=DIFFUSION_SERIES_NUMBERS["dwi"], sop_instance_uid=uid,
                instance_number=number, description=seq.description, attributes=attributes,
                synthetic=simulated, window=window, moment=moment))

    adc_storage = synthesis.PixelStorage(bits_stored=site.bits_stored,
                                         signed=site.pixel_representation == 1, rescale=None)
    stored = adc_storage.store(np.rint(dwi.adc / diffusion.ADC_UNIT_MM2_S))
    window = synthesis.display_window(adc_storage.values(stored))
    attributes = common | {
        "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"],
        "SequenceName": f"{seq.sequence_name}{diffusion.B_VALUES[1]}t",
        "ImageComments": f"{common['ImageComments']}; apparent diffusion coefficient in "
                         "1e-6 mm2/s",
    }
    description = (f"ADC = ln(S(b={diffusion.B_VALUES[0]}) / S(b={diffusion.B_VALUES[1]})) / "
                   f"{diffusion.B_VALUES[1] - diffusion.B_VALUES[0]} s/mm2, in 1e-6 mm2/s, "
                   "computed by the simulated scanner")
    adc = [
        _image(stored[k], k, geometry, site, info, adc_storage, series="adc",
               series_number=DIFFUSION_SERIES_NUMBERS["adc"],
               sop_instance_uid=info.uid("instance", "adc", k), instance_number=number,
               description=f"{seq.description} ADC", attributes=attributes,
               synthetic=synthesis.Synthetic(
                   simulated.equipment,
                   synthesis.Derivation(description, ADC_DERIVATION, tuple(sources[k]))),
               window=window, moment=moment)
        for number, k in enumerate(order, start=1)
    ]
    return {"dwi": images, "adc": adc}


def write_mask_nifti(mask: np.ndarray, geometry: Geometry, path: Path) -> None:
    """The tumour mask (slices ascending along the normal) as NIfTI in patient space."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetOrigin([float(v) for v in geometry.positions[0]])
    image.SetSpacing([geometry.column_spacing_mm, geometry.row_spacing_mm,
                      geometry.slice_spacing_mm])
    axes = np.stack([geometry.row_direction, geometry.column_direction, geometry.normal], axis=1)
    image.SetDirection([float(v) for v in axes.ravel()])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def write_mask_seg(mask: np.ndarray, t1w: list[Dataset], info: PatientInfo,
                   site: Site, path: Path) -> None:
    """The ground-truth tumour as a binary DICOM SEG referencing the T1w series.

    ``mask`` is ascending along the normal; ``t1w`` in the site's instance order.
    """
    ordered = synthesis.sort_along_normal(t1w)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="GTV-NPC (simulated ground truth)",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=SOFTWARE, version="1", family=codes.cid7162.ArtificialIntelligence
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=mask.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=info.uid("series", "seg"),
        series_number=90,
        sop_instance_uid=info.uid("instance", "seg"),
        instance_number=1,
        manufacturer=synthesis.MANUFACTURER,
        manufacturer_model_name=SOFTWARE,
        software_versions="1",
        device_serial_number=f"SIM{site.key.upper()}",
        series_description="GTV ground truth (simulated)",
    )
    # highdicom stamps the current time; the cohort's files must depend on its seed only.
    created = info.study_datetime + _dt.timedelta(hours=1)
    date, time = created.strftime("%Y%m%d"), created.strftime("%H%M%S")
    seg.InstanceCreationDate, seg.InstanceCreationTime = date, time
    seg.ContentDate, seg.ContentTime = date, time
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = created.strftime("%Y%m%d%H%M%S")
    random_uid = seg.DimensionOrganizationSequence[0].DimensionOrganizationUID
    fixed_uid = info.uid("seg", "dimensions")

    def _fix(dataset: Dataset, element: pydicom.DataElement) -> None:
        if element.VR == "UI" and element.value == random_uid:
            element.value = fixed_uid

    seg.walk(_fix)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
