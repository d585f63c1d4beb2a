"""The objects written for the TPS: the synthetic series in the T1w's geometry and units, the
RTSTRUCT helpers, the review image; valid for dciodvfy, readable by rt-utils, accepted by
Orthanc; across institutions and odd source geometry."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage
from support.models import make_checkpoint

from config import PlanningSettings
from planning import write_outputs
from simulation import SITES, SimulationOptions, simulate_cohort
from simulation.acquisition import acquire, draw_protocols, make_geometry, scene
from simulation.export import PatientInfo, series_datasets
from simulation.phantom import sample_patient
from simulation.sites import Grid
from synthesis import PipelineOptions, Synthesizer, derived_uid, read_series, write_series

SETTINGS = PlanningSettings(min_region_mm3=0.0)

#: Odd source geometry (issue point 5): institution to start from and what to change.
ODD = {
    "non-square-pixels": ("inst5", {"grid": Grid(200, 160, 0.9, 1.2, 4.0)}),
    "matrix-320": ("inst6", {"grid": Grid(320, 320, 0.72, 0.72, 4.0), "tilt_deg": 0.0}),
    "matrix-512": ("inst5", {"grid": Grid(512, 512, 0.45, 0.45, 4.0)}),
    "signed": ("inst4", {}),
    "rescale-slope": ("inst2", {}),
    "oblique": ("inst6", {"grid": Grid(160, 160, 1.44, 1.44, 4.0)}),
    "descending": ("inst7", {"grid": Grid(144, 144, 1.6, 1.6, 4.0), "rescale": None}),
}


def _write_study(folder: Path, site_key: str, changes: dict, slices: int = 6) -> None:
    """A simulated T1w/T2w pair for an institution with ``changes`` to its profile."""
    site = replace(SITES[site_key], t2w_grid=None, **changes)
    rng = np.random.default_rng(7)
    patient = sample_patient(rng, tumour_diameter_mm=30.0)
    protocols = draw_protocols(site, rng)
    seed = f"planning-test/{site_key}/{sorted(changes)}"
    info = PatientInfo("SIM-ODD", "SIM^ODD", "M", 60, 70.0, derived_uid(seed, "study"),
                       derived_uid(seed, "frame"), dt.datetime(2024, 5, 1, 9), seed)
    geometry = make_geometry(site.grid, slices, site.tilt_deg)
    anatomy = scene(patient, geometry)
    for role in ("t1w", "t2w"):
        volume = acquire(anatomy, patient, site, role, protocols[role], 1.0, rng)
        write_series(series_datasets(volume, geometry, site, role, protocols[role], info),
                     folder / role)


@pytest.fixture(scope="module")
def synthesizer(tmp_path_factory) -> Synthesizer:
    out = tmp_path_factory.mktemp("planning-model")
    simulate_cohort(out, SimulationOptions(institutions=("inst2",), patients_per_institution=2,
                                           matrix_scale=0.25, slices=6))
    make_checkpoint(out / "model.safetensors", out, ("inst2",))
    return Synthesizer(out / "model.safetensors", PipelineOptions(device="cpu", screen=False))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, synthesizer):
    """Every odd case processed once: {case: (study folder, out folder, result, written)}."""
    done = {}
    for case, (site, changes) in ODD.items():
        root = tmp_path_factory.mktemp(case)
        _write_study(root / "study", site, changes)
        t1 = read_series(root / "study" / "t1w")
        t2 = read_series(root / "study" / "t2w")
        result = synthesizer.run(t1, t2)
        header = pydicom.dcmread(sorted((root / "study" / "t1w").glob("*.dcm"))[0])
        written = write_outputs(result, header, root / "out", SETTINGS)
        done[case] = (root / "study", root / "out", result, written)
    return done


def _by_position(datasets):
    def along(ds):
        o = np.asarray(ds.ImageOrientationPatient, float)
        return float(np.dot(ds.ImagePositionPatient, np.cross(o[:3], o[3:])))
    return sorted(datasets, key=along)


@pytest.mark.parametrize("case", sorted(ODD))
def test_synthetic_series_has_the_t1w_geometry_and_units(outputs, case):
    study, _, result, written = outputs[case]
    source = _by_position([pydicom.dcmread(p) for p in (study / "t1w").glob("*.dcm")])
    synthetic = _by_position([pydicom.dcmread(o.path) for o in written.series])
    assert len(synthetic) == len(source)
    vce = np.asarray(result.vce.array)
    for k, (a, b) in enumerate(zip(source, synthetic, strict=True)):
        np.testing.assert_allclose(b.ImagePositionPatient, a.ImagePositionPatient, atol=1e-3)
        np.testing.assert_allclose(b.ImageOrientationPatient, a.ImageOrientationPatient,
                                   atol=1e-5)
        np.testing.assert_allclose(b.PixelSpacing, a.PixelSpacing, rtol=1e-5)
        assert (b.Rows, b.Columns) == (a.Rows, a.Columns)
        assert b.FrameOfReferenceUID == a.FrameOfReferenceUID
        assert b.StudyInstanceUID == a.StudyInstanceUID and b.PatientID == a.PatientID
        slope = float(getattr(b, "RescaleSlope", 1.0))
        np.testing.assert_allclose(b.pixel_array * slope, vce[k], atol=slope * 0.51)
        if "RescaleSlope" in a:  # the T1w's own convention is kept
            assert float(b.RescaleSlope) == float(a.RescaleSlope)


@pytest.mark.parametrize("case", sorted(ODD))
def test_synthetic_series_says_it_is_synthetic(outputs, case):
    study, _, _, written = outputs[case]
    t1_uids = {pydicom.dcmread(p).SOPInstanceUID for p in (study / "t1w").glob("*.dcm")}
    t2_uids = {pydicom.dcmread(p).SOPInstanceUID for p in (study / "t2w").glob("*.dcm")}
    for path in [o.path for o in written.series]:
        ds = pydicom.dcmread(path)
        assert ds.SyntheticData == "YES"
        assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert "SYNTHETIC" in ds.SeriesDescription
        assert "no contrast agent" in ds.DerivationDescription
        assert not any(k.startswith("ContrastBolus") for k in ds.dir())
        assert ds.BurnedInAnnotation == "NO"
        referenced = {item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence}
        assert referenced & t1_uids and referenced & t2_uids
        assert (ds.ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0]
                .CodeMeaning == "Synthesizing Equipment")


@pytest.mark.dciodvfy
@pytest.mark.parametrize("case", sorted(ODD))
def test_dciodvfy_finds_no_errors_in_any_object(outputs, dciodvfy, case):
    _, _, _, written = outputs[case]
    for path in [written.series[0].path, written.rtstruct.path, written.review.path]:
        assert path is not None
        report = dciodvfy(path)
        assert report.ok, (path.name, report.errors)


def _pixel_indices(points: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Patient points -> (row, column) on an image, with the correct spacing per axis."""
    o = np.asarray(ds.ImageOrientationPatient, float)
    offset = points - np.asarray(ds.ImagePositionPatient, float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    return np.stack([offset @ o[3:] / row_spacing, offset @ o[:3] / column_spacing], 1)


@pytest.mark.parametrize("case", sorted(ODD))
def test_contours_sit_on_their_region_boundaries(outputs, case):
    _, _, _, written = outputs[case]
    structure = pydicom.dcmread(written.rtstruct.path)
    images = {ds.SOPInstanceUID: (k, ds) for k, ds in
              enumerate(_by_position([pydicom.dcmread(o.path) for o in written.series]))}
    helpers, _ = __import__("planning").helper_regions(outputs[case][2], SETTINGS)
    masks = {h.name: h.mask for h in helpers}
    names = {roi.ROINumber: roi.ROIName for roi in structure.StructureSetROISequence}
    assert set(names.values()) == set(masks)
    for contour_set in structure.ROIContourSequence:
        mask = masks[names[contour_set.ReferencedROINumber]]
        for item in contour_set.ContourSequence:
            k, image = images[item.ContourImageSequence[0].ReferencedSOPInstanceUID]
            points = np.asarray(item.ContourData, float).reshape(-1, 3)
            # On the slice's plane...
            o = np.asarray(image.ImageOrientationPatient, float)
            normal = np.cross(o[:3], o[3:])
            distance = (points - np.asarray(image.ImagePositionPatient, float)) @ normal
            assert np.abs(distance).max() < 1e-2
            # ...through the region's boundary pixels (regions one or two pixels thin are
            # drawn as the square around them, half a pixel out).
            indices = _pixel_indices(points, image)
            assert (indices >= -0.51).all()
            assert (indices <= np.array(mask.shape[1:]) - 0.49).all()
            near = ndimage.binary_dilation(mask[k], structure=np.ones((3, 3)))
            limit = np.array(mask.shape[1:]) - 1
            hit = np.zeros(len(points), bool)
            for rounding in (np.floor, np.ceil):  # a square's corner sits between pixels
                for other in (np.floor, np.ceil):
                    rows = np.clip(rounding(indices[:, 0] + 1e-6).astype(int), 0, limit[0])
                    columns = np.clip(other(indices[:, 1] + 1e-6).astype(int), 0, limit[1])
                    hit |= near[rows, columns]
            assert hit.all()
            centres = np.abs(_pixel_indices(points, image) - np.rint(
                _pixel_indices(points, image))).max()
            assert centres < 1e-2 or len(points) == 4


@pytest.mark.parametrize("case", ["matrix-320", "oblique", "descending", "signed",
                                  "rescale-slope"])
def test_rt_utils_reads_back_the_same_regions(outputs, case):
    # rt-utils mis-scales non-square pixels (row direction x PixelSpacing[0]); square only.
    from rt_utils import RTStructBuilder

    _, out, result, written = outputs[case]
    rt = RTStructBuilder.create_from(dicom_series_path=str(out / "synthetic"),
                                     rt_struct_path=str(written.rtstruct.path))
    helpers, _ = __import__("planning").helper_regions(result, SETTINGS)
    for helper in helpers:
        theirs = np.moveaxis(rt.get_roi_mask_by_name(helper.name), 2, 0)  # (slices, rows, cols)
        ours = helper.mask
        assert theirs.shape == ours.shape
        grown_ours = ndimage.binary_dilation(ours, structure=np.ones((1, 3, 3)))
        grown_theirs = ndimage.binary_dilation(theirs, structure=np.ones((1, 3, 3)))
        assert not (theirs & ~grown_ours).any(), helper.name  # within one voxel
        assert not (ours & ~grown_theirs).any(), helper.name


def test_helpers_are_named_coloured_and_typed(outputs):
    _, _, _, written = outputs["rescale-slope"]
    structure = pydicom.dcmread(written.rtstruct.path)
    names = [roi.ROIName for roi in structure.StructureSetROISequence]
    assert all(n.startswith("zVCE_") for n in names)
    assert "zVCE_External" in names and "zVCE_Enhancement" in names
    numbers = {roi.ROINumber: roi.ROIName for roi in structure.StructureSetROISequence}
    types = {numbers[o.ReferencedROINumber]: o.RTROIInterpretedType
             for o in structure.RTROIObservationsSequence}
    assert types["zVCE_External"] == "EXTERNAL" and types["zVCE_Enhancement"] == "CONTROL"
    assert all(len(c.ROIDisplayColor) == 3 for c in structure.ROIContourSequence)
    synthetic = pydicom.dcmread(written.series[0].path)
    referenced = structure.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    assert referenced.RTReferencedSeriesSequence[0].SeriesInstanceUID == \
        synthetic.SeriesInstanceUID
    assert "SYNTHETIC" in structure.SeriesDescription


def test_empty_helpers_are_omitted_and_noted(outputs, synthesizer, tmp_path):
    study, _, result, _ = outputs["signed"]
    strict = PlanningSettings(enhancement_threshold=1000.0, low_confidence_threshold=1e-6)
    header = pydicom.dcmread(sorted((study / "t1w").glob("*.dcm"))[0])
    written = write_outputs(result, header, tmp_path, strict)
    structure = pydicom.dcmread(written.rtstruct.path)
    assert [r.ROIName for r in structure.StructureSetROISequence] == ["zVCE_External"]
    assert "zVCE_Enhancement omitted: empty" in written.notes
    assert "zVCE_Enhancement omitted: empty" in structure.StructureSetDescription


def test_review_image_png_and_secondary_capture(outputs):
    from PIL import Image

    study, _, _, written = outputs["oblique"]
    png = Image.open(written.review_png)
    assert png.mode == "RGB" and png.width > 4 * png.height // 2
    sc = pydicom.dcmread(written.review.path)
    t1 = pydicom.dcmread(sorted((study / "t1w").glob("*.dcm"))[0])
    assert sc.StudyInstanceUID == t1.StudyInstanceUID
    assert sc.BurnedInAnnotation == "YES" and sc.SyntheticData == "YES"
    assert sc.pixel_array.shape == (png.height, png.width, 3)
    np.testing.assert_array_equal(sc.pixel_array, np.asarray(png))


def test_every_object_states_the_verdict(outputs):
    from planning.verdict import LOW_CONFIDENCE

    _, _, result, written = outputs["oblique"]
    verdict = written.verdict
    low = next((h for h in __import__("planning").helper_regions(result, SETTINGS)[0]
                if h.name.endswith("LowConfidence")), None)
    assert (verdict.state == LOW_CONFIDENCE) == (low is not None)
    if low is not None:
        head = result.vce.array > 0
        expected = 100 * (low.mask & head).sum() / head.sum()
        assert verdict.low_confidence_head_percent == pytest.approx(expected, abs=0.01)
    line = verdict.line()
    for o in written.series:
        assert pydicom.dcmread(o.path, stop_before_pixels=True).ImageComments.endswith(
            f"Verdict: {line}")
    assert f"Verdict: {line}" in pydicom.dcmread(written.rtstruct.path).StructureSetDescription


def test_reprocessing_gives_the_same_uids(outputs, tmp_path):
    study, _, result, written = outputs["signed"]
    header = pydicom.dcmread(sorted((study / "t1w").glob("*.dcm"))[0])
    again = write_outputs(result, header, tmp_path, SETTINGS)
    uids = [o.sop_instance_uid for o in written.series]
    assert uids == [pydicom.dcmread(o.path).SOPInstanceUID for o in again.series]
    assert pydicom.dcmread(again.rtstruct.path).SOPInstanceUID == \
        pydicom.dcmread(written.rtstruct.path).SOPInstanceUID


def test_burned_in_marker(outputs, tmp_path):
    study, _, result, _ = outputs["matrix-320"]
    header = pydicom.dcmread(sorted((study / "t1w").glob("*.dcm"))[0])
    marked = write_outputs(result, header, tmp_path, PlanningSettings(burn_in_marker=True))
    ds = pydicom.dcmread(marked.series[0].path)
    assert ds.BurnedInAnnotation == "YES"
    corner = ds.pixel_array[2:20, 2:90]
    assert (corner == ds.pixel_array.max()).any()


@pytest.mark.dcmtk
@pytest.mark.orthanc
def test_orthanc_stores_every_object_in_the_right_study(outputs, orthanc, send):
    study, _, _, written = outputs["descending"]
    t1 = [pydicom.dcmread(p) for p in (study / "t1w").glob("*.dcm")]
    result = send([o.path for o in written.objects()], orthanc.dicom_port, called_ae=orthanc.ae_title)
    assert result.ok, result.output
    [study_id] = orthanc.post("/tools/find", {"Level": "Study", "Query": {
        "StudyInstanceUID": t1[0].StudyInstanceUID}})
    series = orthanc.get(f"/studies/{study_id}/series")
    modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
    assert modalities == ["MR", "OT", "RTSTRUCT"]
    [mr] = [s for s in series if s["MainDicomTags"]["Modality"] == "MR"]
    assert len(mr["Instances"]) == len(t1)
    stored = {tuple(round(float(v), 2) for v in orthanc.tags(i)["ImagePositionPatient"]
                    .split("\\")) for i in mr["Instances"]}
    assert stored == {tuple(round(float(v), 2) for v in ds.ImagePositionPatient) for ds in t1}
