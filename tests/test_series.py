"""Reading MR series into volumes: geometry, scanner units, compressed and multi-frame data,
and the refusals (missing, duplicate, wrong modality, mismatched pairs) with their reasons."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from support.tools import require

from config import InputError
from simulation import SimulationOptions, simulate_cohort
from synthesis.alignment import align, resample_onto
from synthesis.series import check_pair, read_series, scan_folder


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("series")
    simulate_cohort(out, SimulationOptions(
        institutions=("inst1", "inst2", "inst4", "inst6"), patients_per_institution=1,
        matrix_scale=0.25, slices=8))
    return out


def _folder(cohort: Path, institution: str, role: str) -> Path:
    return cohort / institution / f"{institution}-001" / role


def _copy(cohort: Path, institution: str, role: str, tmp_path: Path) -> Path:
    target = tmp_path / role
    shutil.copytree(_folder(cohort, institution, role), target)
    return target


@pytest.mark.parametrize("institution", ["inst1", "inst2", "inst4", "inst6"])
def test_volume_matches_what_simpleitk_reads(cohort, institution):
    folder = _folder(cohort, institution, "t1w")
    volume = read_series(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    reference = reader.Execute()
    assert volume.image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(volume.image.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(volume.image.GetSpacing(), reference.GetSpacing(), rtol=1e-4)
    np.testing.assert_allclose(volume.image.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(volume.array, sitk.GetArrayFromImage(reference), rtol=1e-5)


def test_slices_sorted_along_the_normal_whatever_the_instance_order(cohort):
    volume = read_series(_folder(cohort, "inst2", "t1w"))  # descending instance order
    direction = np.reshape(volume.image.GetDirection(), (3, 3))
    positions = [volume.image.TransformIndexToPhysicalPoint((0, 0, k))
                 for k in range(volume.shape[0])]
    along = [float(np.dot(p, direction[:, 2])) for p in positions]
    assert along == sorted(along)
    first = pydicom.dcmread(_folder(cohort, "inst2", "t1w") / "0001.dcm")
    assert volume.sources[-1].sop_instance_uid == first.SOPInstanceUID


def test_rescale_slope_gives_scanner_units(cohort):
    folder = _folder(cohort, "inst2", "t1w")
    volume = read_series(folder)
    ds = pydicom.dcmread(folder / "0004.dcm")
    k = [s.sop_instance_uid for s in volume.sources].index(ds.SOPInstanceUID)
    np.testing.assert_allclose(volume.array[k], ds.pixel_array * float(ds.RescaleSlope))
    assert float(ds.RescaleSlope) != 1.0


def test_signed_pixels(cohort):
    volume = read_series(_folder(cohort, "inst4", "t1w"))
    assert pydicom.dcmread(_folder(cohort, "inst4", "t1w") / "0001.dcm").PixelRepresentation == 1
    assert volume.array.dtype == np.float32


@pytest.mark.dcmtk
@pytest.mark.parametrize("encoder", [["dcmcjpls"], ["dcmcjpeg", "+e1"], ["dcmcrle"]])
def test_compressed_series_read_the_same(cohort, tmp_path, encoder):
    original = _folder(cohort, "inst6", "t1w")
    target = tmp_path / "compressed"
    target.mkdir()
    tool, *options = encoder
    for path in sorted(original.glob("*.dcm")):
        subprocess.run([str(require(tool)), *options, str(path), str(target / path.name)],
                       check=True)
    assert pydicom.dcmread(target / "0001.dcm").file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(read_series(target).array, read_series(original).array)


def test_multiframe_enhanced_mr_reads_like_the_classic_series(cohort, tmp_path):
    folder = _folder(cohort, "inst6", "t1w")  # oblique
    classic = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        classic, series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    volume = read_series(path)
    reference = read_series(folder)
    np.testing.assert_allclose(volume.array, reference.array)
    np.testing.assert_allclose(volume.image.GetOrigin(), reference.image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(volume.image.GetDirection(), reference.image.GetDirection(),
                               atol=1e-6)
    assert {s.frame for s in volume.sources} == set(range(1, len(classic) + 1))


def test_a_missing_slice_is_refused(cohort, tmp_path):
    folder = _copy(cohort, "inst4", "t1w", tmp_path)
    (folder / "0004.dcm").unlink()
    with pytest.raises(InputError, match=r"missing or irregular slices between .* \(gap .* mm, "
                                         r"expected .* mm\)"):
        read_series(folder)


def test_a_duplicate_slice_is_refused_but_a_resent_instance_is_not(cohort, tmp_path):
    folder = _copy(cohort, "inst4", "t1w", tmp_path)
    shutil.copy(folder / "0003.dcm", folder / "0003-resent.dcm")
    assert read_series(folder).shape[0] == 8
    ds = pydicom.dcmread(folder / "0003.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "0003-copy.dcm")
    with pytest.raises(InputError, match="duplicate slices"):
        read_series(folder)


def test_not_mr_is_refused(cohort, tmp_path):
    folder = _copy(cohort, "inst4", "t1w", tmp_path)
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.Modality = "CT"
        ds.save_as(path)
    with pytest.raises(InputError, match="is CT, not MR"):
        read_series(folder)


def test_truncated_and_foreign_files_are_refused_with_the_file_named(cohort, tmp_path):
    folder = _copy(cohort, "inst4", "t1w", tmp_path)
    data = (folder / "0002.dcm").read_bytes()
    (folder / "0002.dcm").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="0002.dcm"):
        read_series(folder)
    (folder / "0002.dcm").write_text("not dicom")
    with pytest.raises(InputError, match="0002.dcm is not a readable DICOM file"):
        read_series(folder)


def test_scan_folder_groups_series_and_skips_junk(cohort, tmp_path):
    shutil.copytree(cohort / "inst2", tmp_path / "study")
    (tmp_path / "study" / "notes.txt").write_text("hello")
    groups = scan_folder(tmp_path / "study")
    assert len(groups) == 4  # t1w, t2w, ce and the SEG
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no DICOM series found"):
        scan_folder(tmp_path / "empty")


def test_pairs_must_share_patient_study_and_frame(cohort, tmp_path):
    t1 = read_series(_folder(cohort, "inst2", "t1w"))
    check_pair(t1, read_series(_folder(cohort, "inst2", "t2w")))
    with pytest.raises(InputError, match="different patients"):
        check_pair(t1, read_series(_folder(cohort, "inst4", "t2w")))
    folder = _copy(cohort, "inst2", "t2w", tmp_path)
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = "1.2.3.4"
        ds.save_as(path)
    with pytest.raises(InputError, match="different frames of reference"):
        check_pair(t1, read_series(folder))


def test_t2w_on_its_own_grid_is_resampled_onto_the_t1w_grid(cohort):
    t1 = read_series(_folder(cohort, "inst1", "t1w"))
    t2 = read_series(_folder(cohort, "inst1", "t2w"))
    assert t2.image.GetSize() != t1.image.GetSize()  # Hospital 1's STIR is 320, T1w 256
    on_grid = resample_onto(t2, t1)
    assert on_grid.image.GetSize() == t1.image.GetSize()
    assert on_grid.image.GetOrigin() == t1.image.GetOrigin()
    # Each T1w voxel holds the T2w interpolated at the same physical point.
    for index in [(10, 12, 3), (20, 30, 4), (40, 33, 5)]:
        point = t1.image.TransformIndexToPhysicalPoint(index)
        continuous = t2.image.TransformPhysicalPointToContinuousIndex(point)
        expected = _trilinear(t2.array, continuous)
        assert on_grid.array[index[2], index[1], index[0]] == pytest.approx(expected, rel=1e-4,
                                                                             abs=1e-3)


def _trilinear(array: np.ndarray, index: tuple[float, float, float]) -> float:
    x, y, z = index
    x0, y0, z0 = int(np.floor(x)), int(np.floor(y)), int(np.floor(z))
    total = 0.0
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                weight = ((1 - abs(x - x0 - dx)) * (1 - abs(y - y0 - dy)) * (1 - abs(z - z0 - dz)))
                total += weight * float(array[z0 + dz, y0 + dy, x0 + dx])
    return total


def _registration_case(out: Path, misalign_mm: float):
    """inst2 (T2w TSE) at half the clinical matrix, 24 slices: registration needs real
    resolution, not the 8-slice miniature the other tests use."""
    simulate_cohort(out, SimulationOptions(
        institutions=("inst2",), patients_per_institution=1, matrix_scale=0.5, slices=24,
        misalign_mm=misalign_mm))
    truth = json.loads((out / "cohort.json").read_text())["patients"][0]["misalignment"]
    return (read_series(_folder(out, "inst2", "t1w")), read_series(_folder(out, "inst2", "t2w")),
            truth)


def test_registration_corrects_a_moved_t2w(tmp_path):
    t1, t2, truth = _registration_case(tmp_path, 4.0)
    _, alignment = align(t1, t2, "auto", tolerance_mm=1.0)
    assert alignment.registered and alignment.applied
    found = np.asarray(alignment.parameters[3:])
    assert np.linalg.norm(found - np.asarray(truth["t2w"])) < 1.5  # mm, with <= 2 deg turns
    _, again = align(t1, t2, "auto", tolerance_mm=1.0)
    np.testing.assert_allclose(again.parameters, alignment.parameters, atol=1e-9)  # repeatable
    never, skipped = align(t1, t2, "never")
    assert not skipped.registered and never.image.GetSize() == t1.image.GetSize()


def test_registration_leaves_aligned_series_alone(tmp_path):
    t1, t2, truth = _registration_case(tmp_path, 0.0)
    assert truth == {}
    _, alignment = align(t1, t2, "auto", tolerance_mm=1.0)
    assert alignment.displacement_mm < 1.0
    assert not alignment.applied
