"""The simulated multi-institution cohorts: reproducible, valid DICOM, physics with the
properties the seeds need, geometry that survives a round trip, a working command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from support.cohorts import manifest_rows as _manifest
from support.cohorts import role_series as _series

from config import Settings
from simulation import SITES, SimulationOptions, simulate_cohort
from simulation.acquisition import acquire, draw_protocols, make_geometry, scene
from simulation.phantom import _Space, _tumour, sample_patient, sample_tumour
from simulation.tissues import Tissue

SMALL = {"matrix_scale": 0.25, "slices": 6}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """One small patient per institution, with preview."""
    out = tmp_path_factory.mktemp("cohort")
    simulate_cohort(out, SimulationOptions(patients_per_institution=1, seed=11, **SMALL),
                    preview=True, workers=2)
    return out


def _volume(datasets: list[pydicom.Dataset]) -> np.ndarray:
    """Scanner units, rescale applied."""
    return np.stack([ds.pixel_array * float(getattr(ds, "RescaleSlope", 1.0))
                     + float(getattr(ds, "RescaleIntercept", 0.0)) for ds in datasets])


def test_manifest_lists_every_series_and_mask(cohort):
    rows = _manifest(cohort)
    assert len(rows) == len(SITES) * 5
    for row in rows:
        assert (cohort / row["path"]).exists(), row
    assert {r["role"] for r in rows} == {"t1w", "t2w", "ce", "mask", "seg"}


def test_same_seed_same_bytes_different_seed_different_anatomy(tmp_path):
    options = SimulationOptions(institutions=("inst5",), patients_per_institution=1, seed=3,
                                **SMALL)
    simulate_cohort(tmp_path / "a", options)
    simulate_cohort(tmp_path / "b", options)
    simulate_cohort(tmp_path / "c", SimulationOptions(
        institutions=("inst5",), patients_per_institution=1, seed=4, **SMALL))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.dcm"))
    assert len(files) == 3 * SMALL["slices"] + 1
    for relative in files:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes()
    mask = {k: sitk.GetArrayFromImage(sitk.ReadImage(
        str(tmp_path / k / "inst5/inst5-001/tumour.nii.gz"))) for k in "ac"}
    assert not np.array_equal(mask["a"], mask["c"])
    t1 = {k: _volume(_series(tmp_path / k, "inst5", "t1w")) for k in "ac"}
    assert np.abs(t1["a"] - t1["c"]).mean() > 0.05 * t1["a"].mean()


def test_a_patient_does_not_depend_on_the_rest_of_the_cohort(tmp_path):
    alone = SimulationOptions(institutions=("inst4",), patients_per_institution=1, **SMALL)
    together = SimulationOptions(institutions=("inst1", "inst4"), patients_per_institution=1,
                                 **SMALL)
    simulate_cohort(tmp_path / "alone", alone, workers=1)
    simulate_cohort(tmp_path / "together", together, workers=2)
    for path in (tmp_path / "alone" / "inst4").rglob("*.dcm"):
        twin = tmp_path / "together" / path.relative_to(tmp_path / "alone")
        assert path.read_bytes() == twin.read_bytes()


@pytest.mark.dciodvfy
@pytest.mark.parametrize("institution", sorted(SITES))
def test_dciodvfy_finds_no_errors(cohort, dciodvfy, institution):
    folder = cohort / institution / f"{institution}-001"
    files = [sorted((folder / role).glob("*.dcm"))[0] for role in ("t1w", "t2w", "ce")]
    for path in [*files, folder / "tumour_seg.dcm"]:
        report = dciodvfy(path)
        assert report.ok, (path, report.errors)


@pytest.mark.parametrize("institution", sorted(SITES))
def test_headers_follow_the_institution(cohort, institution):
    profile = SITES[institution]
    series = {role: _series(cohort, institution, role) for role in ("t1w", "t2w", "ce")}
    t1 = series["t1w"][0]
    assert t1.Manufacturer == profile.manufacturer
    assert float(t1.MagneticFieldStrength) == profile.field_t
    assert t1.InstitutionName.startswith("Simulated")
    assert t1.PixelRepresentation == profile.pixel_representation
    assert ("RescaleSlope" in t1) == (profile.rescale is not None)
    assert "ContrastBolusAgent" in series["ce"][0]
    assert "ContrastBolusAgent" not in t1
    for role in ("t2w", "ce"):
        for a, b in zip(series["t1w"], series[role], strict=False):
            assert a.StudyInstanceUID == b.StudyInstanceUID
            assert a.FrameOfReferenceUID == b.FrameOfReferenceUID
            assert a.PatientID == b.PatientID
        assert series[role][0].SeriesInstanceUID != t1.SeriesInstanceUID
    # Instance order follows the vendor's slice order.
    normal = np.cross(*np.reshape(np.asarray(t1.ImageOrientationPatient, float), (2, 3)))
    along = [float(np.dot(ds.ImagePositionPatient, normal)) for ds in series["t1w"]]
    ascending = profile.slice_order == "ascending"
    assert along == sorted(along, reverse=not ascending)


@pytest.mark.parametrize("institution", sorted(SITES))
def test_default_series_rules_recognize_every_simulated_series(cohort, institution):
    rules = Settings().series_rules
    found = {}
    for role, rule in (("t1w", rules.t1w), ("t2w", rules.t2w), ("ce", rules.contrast_enhanced)):
        for candidate in ("t1w", "t2w", "ce"):
            ds = _series(cohort, institution, candidate)[0]
            header = {k: ds.get(k) for k in ("SeriesDescription", "RepetitionTime", "EchoTime",
                                              "InversionTime", "ContrastBolusAgent")}
            if rule.matches(header):
                found.setdefault(role, []).append(candidate)
    assert found == {"t1w": ["t1w"], "t2w": ["t2w"], "ce": ["ce"]}


@pytest.mark.parametrize("institution", ["inst2", "inst3", "inst6"])
def test_simpleitk_reads_the_geometry_that_was_written(cohort, institution):
    [row] = [r for r in _manifest(cohort) if r["institution"] == institution and r["role"] == "t1w"]
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(cohort / row["path"]))
    reader.SetFileNames(names)
    image = reader.Execute()
    datasets = _series(cohort, institution, "t1w")
    orientation = np.asarray(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    lowest = min(datasets, key=lambda ds: float(np.dot(ds.ImagePositionPatient, normal)))
    np.testing.assert_allclose(image.GetOrigin(), lowest.ImagePositionPatient, atol=1e-3)
    spacing = [float(v) for v in datasets[0].PixelSpacing]
    np.testing.assert_allclose(image.GetSpacing(),
                               [spacing[1], spacing[0], float(datasets[0].SpacingBetweenSlices)],
                               rtol=1e-4)
    direction = np.reshape(image.GetDirection(), (3, 3))
    np.testing.assert_allclose(direction[:, 0], orientation[:3], atol=1e-5)
    np.testing.assert_allclose(direction[:, 1], orientation[3:], atol=1e-5)
    assert image.GetSize() == (datasets[0].Columns, datasets[0].Rows, len(datasets))
    # The ground-truth mask lives on that same grid.
    mask = sitk.ReadImage(str(cohort / row["path"]).replace("/t1w", "/tumour.nii.gz"))
    np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-5)
    assert mask.GetSize() == image.GetSize()


def test_seg_and_nifti_masks_agree(cohort):
    import highdicom as hd

    folder = cohort / "inst2" / "inst2-001"
    seg = hd.seg.segread(folder / "tumour_seg.dcm")
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "tumour.nii.gz")))
    assert int(seg.pixel_array.astype(bool).sum()) == int(nifti.sum()) > 0


def _physics(institution: str, diameter: float = 32.0):
    profile = SITES[institution]
    rng = np.random.default_rng(5)
    patient = sample_patient(rng, tumour_diameter_mm=diameter)
    protocols = draw_protocols(profile, rng)
    geometry = make_geometry(profile.grid, 14, profile.tilt_deg, 0.5)
    acquired = scene(patient, geometry)
    t1 = acquire(acquired, patient, profile, "t1w", protocols["t1w"], 1.0, rng)
    ce = acquire(acquired, patient, profile, "ce", protocols["ce"], 1.0, rng, protocols["t1w"])
    return acquired, t1, ce


@pytest.mark.parametrize("institution", sorted(SITES))
def test_contrast_enhances_the_tumour_not_the_brain(institution):
    acquired, t1, ce = _physics(institution)
    tumour = acquired.labels == Tissue.TUMOUR
    brain = np.isin(acquired.labels, (Tissue.GREY_MATTER, Tissue.WHITE_MATTER))
    assert tumour.sum() > 50 and brain.sum() > 50
    assert ce[tumour].mean() / t1[tumour].mean() > 1.5
    assert ce[brain].mean() / t1[brain].mean() < 1.1


def test_enhancement_is_not_a_function_of_t1w_and_t2w():
    # Tumour and normal mucosa look alike before contrast and differ after it.
    profile = SITES["inst1"]
    rng = np.random.default_rng(5)
    patient = sample_patient(rng, tumour_diameter_mm=32.0)
    protocols = draw_protocols(profile, rng)
    geometry = make_geometry(profile.grid, 14, 0.0, 0.5)
    acquired = scene(patient, geometry)
    series = {role: acquire(acquired, patient, profile, role, protocols[role], 1.0, rng,
                            protocols["t1w"]) for role in ("t1w", "t2w", "ce")}
    tumour = acquired.labels == Tissue.TUMOUR
    mucosa = acquired.labels == Tissue.MUCOSA
    for role in ("t1w", "t2w"):
        ratio = series[role][tumour].mean() / series[role][mucosa].mean()
        assert 0.8 < ratio < 1.25, (role, ratio)
    enhancement = {name: series["ce"][m].mean() / series["t1w"][m].mean()
                   for name, m in (("tumour", tumour), ("mucosa", mucosa))}
    assert enhancement["tumour"] > 1.3 * enhancement["mucosa"]


def test_institution_intensity_scales_differ_several_fold(cohort):
    means = {}
    for institution in SITES:
        volume = _volume(_series(cohort, institution, "t1w"))
        means[institution] = float(volume[volume > np.percentile(volume, 50)].mean())
    assert max(means.values()) / min(means.values()) >= 3.0, means


def test_tumour_sizes_span_one_to_five_centimetres():
    diameters = []
    grid = np.mgrid[-40:40:1.0, -35:45:1.0, -35:45:1.0].reshape(3, -1).T.astype(np.float32)
    for seed in range(40):
        patient = sample_patient(np.random.default_rng(seed))
        order = np.argsort(grid[:, 2], kind="stable")
        inside, _ = _tumour(patient, _Space(grid[order]))
        diameters.append((6 * inside.sum() / np.pi) ** (1 / 3))  # 1 mm^3 voxels
    assert min(diameters) < 15.0
    assert max(diameters) > 40.0
    assert all(d > 5.0 for d in diameters)


def test_large_tumours_can_infiltrate_and_necrose():
    specs = [sample_tumour(np.random.default_rng(s), 45.0) for s in range(30)]
    assert any(t.skull_base_infiltration for t in specs)
    assert any(t.parapharyngeal_infiltration for t in specs)
    assert any(t.necrosis_radius_mm > 0 for t in specs)
    small = [sample_tumour(np.random.default_rng(s), 10.0) for s in range(30)]
    assert not any(t.skull_base_infiltration or t.necrosis_radius_mm for t in small)


def test_misalignment_moves_the_patient_between_series(tmp_path):
    records = simulate_cohort(tmp_path, SimulationOptions(
        institutions=("inst5",), patients_per_institution=1, misalign_mm=3.0, **SMALL))
    moved = records[0].misalignment
    assert set(moved) == {"t2w", "ce"}
    for shift in moved.values():
        assert 0 < max(abs(v) for v in shift) <= 3.0
    summary = json.loads((tmp_path / "cohort.json").read_text())
    assert summary["patients"][0]["misalignment"] == moved


def test_preview_png_has_a_row_per_institution(cohort):
    from PIL import Image

    image = Image.open(cohort / "preview.png")
    assert image.width == 4 * 220
    assert image.height > len(SITES) * 220


def test_simulate_command(tmp_path):
    out = tmp_path / "cohort"
    argv = [sys.executable, "-m", "vcemri", "simulate", "--out", str(out), "--institutions",
            "inst2,inst5", "--patients-per-institution", "2", "--matrix-scale", "0.2",
            "--slices", "4", "--quiet", "--workers", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "simulated 4 patients from 2 institutions" in done.stdout
    assert len(_manifest(out)) == 4 * 5
    again = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"vcemri: error: output directory {out} is not empty (choose another or pass --overwrite)"
    )
    bad = subprocess.run(argv[:5] + [str(tmp_path / "x"), "--institutions", "inst9"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2
    assert "unknown institution inst9" in bad.stderr
