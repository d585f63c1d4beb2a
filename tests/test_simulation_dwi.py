"""The simulator's opt-in diffusion-weighted imaging (``vcemri simulate --dwi``): a cohort
without it is unchanged, the DWI series holds b = 0 and 1000, the ADC follows the tissues'
diffusivities (the tumour's restricted), and the EPI is coarser and distorted."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from support.cohorts import manifest_rows as _manifest
from support.cohorts import role_series as _series

from config import Settings
from simulation import SITES, SimulationOptions, diffusion, simulate_cohort
from simulation.acquisition import make_geometry, scene
from simulation.phantom import sample_patient
from simulation.tissues import ADC_MM2_S, Tissue

SMALL = {"matrix_scale": 0.25, "slices": 6}
PLAIN = SimulationOptions(institutions=("inst1", "inst4"), patients_per_institution=1, seed=7,
                          misalign_mm=2.0, lesions=1, **SMALL)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    """The same small cohort without and with DWI."""
    out = tmp_path_factory.mktemp("dwi")
    simulate_cohort(out / "plain", PLAIN, workers=1)
    simulate_cohort(out / "dwi", replace(PLAIN, dwi=True), workers=1)
    return {"plain": out / "plain", "dwi": out / "dwi"}


@pytest.fixture(scope="module")
def acquired() -> diffusion.Diffusion:
    """One patient's DWI, straight from the simulator (a 3 cm tumour, inst3, half matrix)."""
    site = SITES["inst3"]
    rng = np.random.default_rng(21)
    patient = sample_patient(rng, 30.0)
    protocol = diffusion.draw_protocol(site, rng)
    geometry = diffusion.geometry(site, 30, protocol, matrix_scale=0.5)
    return diffusion.acquire(patient, site, geometry, protocol, 1.0, rng)


def _values(ds: pydicom.Dataset) -> np.ndarray:
    return (ds.pixel_array * float(getattr(ds, "RescaleSlope", 1.0))
            + float(getattr(ds, "RescaleIntercept", 0.0)))


def test_without_dwi_the_cohort_is_unchanged(cohorts):
    plain, dwi = cohorts["plain"], cohorts["dwi"]
    files = sorted(p.relative_to(plain) for p in plain.rglob("*") if p.is_file())
    compared = [f for f in files if f.suffix in (".dcm", ".gz")]
    assert len(compared) == 2 * (3 * SMALL["slices"] + 2)
    for relative in compared:
        assert (plain / relative).read_bytes() == (dwi / relative).read_bytes(), relative
    rows = {(r["patient"], r["role"]): r["path"] for r in _manifest(dwi)}
    plain_rows = {(r["patient"], r["role"]): r["path"] for r in _manifest(plain)}
    assert {k: v for k, v in rows.items() if k[1] not in ("dwi", "adc")} == plain_rows
    assert {role for _, role in rows} == {"t1w", "t2w", "ce", "mask", "seg", "dwi", "adc"}
    summary = {k: json.loads((v / "cohort.json").read_text()) for k, v in cohorts.items()}
    assert summary["plain"]["options"]["dwi"] is False
    assert summary["dwi"]["options"] == summary["plain"]["options"] | {"dwi": True}
    for before, after in zip(summary["plain"]["patients"], summary["dwi"]["patients"],
                             strict=True):
        assert set(after["protocols"].pop("dwi")) >= {"tr_ms", "te_ms", "epi_shift_max_mm"}
        assert after["misalignment"].pop("dwi")  # the patient moved before the DWI too
        assert after["paths"].pop("dwi") and after["paths"].pop("adc")
        assert after == before


@pytest.mark.parametrize("institution", ["inst1", "inst4"])
def test_one_series_holds_both_b_values_and_b1000_is_darker(cohorts, institution):
    series = _series(cohorts["dwi"], institution, "dwi")
    assert len(series) % 2 == 0
    half = len(series) // 2
    assert [int(ds.InstanceNumber) for ds in series] == list(range(1, 2 * half + 1))
    assert len({ds.SOPInstanceUID for ds in series}) == 2 * half
    assert len({ds.SeriesInstanceUID for ds in series}) == 1
    by_b = {b: [ds for ds in series if float(ds.DiffusionBValue) == b] for b in (0.0, 1000.0)}
    assert [len(v) for v in by_b.values()] == [half, half]
    for b, datasets in by_b.items():
        for ds in datasets:
            assert ds.DiffusionDirectionality == ("ISOTROPIC" if b else "NONE")
            assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "DIFFUSION",
                                          "TRACEW" if b else "NONE"]
            assert list(ds.ScanningSequence) == ["SE", "EP"]
            assert ds.ScanOptions == "FS"
            assert ds.SeriesNumber == 5
            assert ds.SyntheticData == "YES"
            assert float(ds.RepetitionTime) > 3000 and 50 < float(ds.EchoTime) < 100
    positions = [{tuple(ds.ImagePositionPatient) for ds in v} for v in by_b.values()]
    assert positions[0] == positions[1]
    b0 = np.stack([_values(ds) for ds in by_b[0.0]])
    b1000 = np.stack([_values(ds) for ds in by_b[1000.0]])
    head = b0 > 0.3 * b0.mean()
    assert b1000[head].mean() < 0.6 * b0[head].mean()
    t1w = _series(cohorts["dwi"], institution, "t1w")[0]
    assert series[0].StudyInstanceUID == t1w.StudyInstanceUID
    assert series[0].FrameOfReferenceUID == t1w.FrameOfReferenceUID


def test_the_adc_series_is_computed_from_the_dwi_images(cohorts):
    dwi = _series(cohorts["dwi"], "inst1", "dwi")
    adc = _series(cohorts["dwi"], "inst1", "adc")
    assert len(adc) == len(dwi) // 2
    first = adc[0]
    assert list(first.ImageType) == ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
    assert first.SeriesNumber == 6 and first.SeriesDescription.endswith("ADC")
    assert first.DerivationCodeSequence[0].CodeValue == "113041"
    assert len(first.SourceImageSequence) == 2
    assert first.SyntheticData == "YES"
    position = {tuple(ds.ImagePositionPatient): ds for ds in dwi
                if float(ds.DiffusionBValue) == 0}
    for ds in adc:
        b0 = _values(position[tuple(ds.ImagePositionPatient)])
        [b1000] = [_values(d) for d in dwi if float(d.DiffusionBValue) == 1000
                   and tuple(d.ImagePositionPatient) == tuple(ds.ImagePositionPatient)]
        stored = _values(ds)  # 1e-6 mm^2/s
        # Where the stored integers' rounding is small against the signal.
        valid = (stored > 0) & (stored < 4000) & (b1000 > 100)
        assert valid.sum() > 10
        expected = np.log(b0[valid] / b1000[valid]) / 1000 / 1e-6
        assert np.abs(stored[valid] - expected).max() < 20
        assert (stored[b0 < 1] == 0).all()


def test_adc_follows_the_tissues_and_the_tumour_is_restricted(acquired):
    labels, adc = acquired.scene.labels, acquired.adc
    median = {t: float(np.median(adc[labels == t])) for t in
              (Tissue.CSF, Tissue.MUSCLE, Tissue.MUCOSA, Tissue.TUMOUR, Tissue.WHITE_MATTER,
               Tissue.GREY_MATTER, Tissue.PAROTID)}
    assert median[Tissue.TUMOUR] < 0.7 * median[Tissue.MUCOSA]
    assert median[Tissue.TUMOUR] < 0.7 * median[Tissue.MUSCLE]
    assert median[Tissue.CSF] == max(median.values())
    for tissue, value in median.items():
        # CSF loses a little to the noise floor at b = 1000 (Rician bias).
        tolerance = 0.2 if tissue == Tissue.CSF else 0.1
        assert abs(value - ADC_MM2_S[tissue]) < tolerance * ADC_MM2_S[tissue], tissue
    tumour = adc[labels == Tissue.TUMOUR]
    assert 0.02 < tumour.std() / tumour.mean() < 0.2  # a little heterogeneity
    # Restricted diffusion: the tumour stays brighter than the mucosa at b = 1000.
    b1000 = acquired.b1000
    assert b1000[labels == Tissue.TUMOUR].mean() > b1000[labels == Tissue.MUCOSA].mean()
    assert (adc[labels == Tissue.AIR] == 0).mean() > 0.97


def test_epi_is_coarser_thicker_and_distorted_but_bounded(cohorts, acquired):
    for institution in ("inst1", "inst4"):
        t1w = _series(cohorts["dwi"], institution, "t1w")
        dwi = _series(cohorts["dwi"], institution, "dwi")
        assert float(dwi[0].PixelSpacing[0]) > 1.8 * float(t1w[0].PixelSpacing[0])
        assert dwi[0].Rows < t1w[0].Rows
        assert 4.0 <= float(dwi[0].SliceThickness) <= 5.0
        assert float(dwi[0].SliceThickness) >= float(t1w[0].SliceThickness)

        def voxel(ds: pydicom.Dataset) -> float:
            return float(np.prod([float(v) for v in ds.PixelSpacing]) * ds.SliceThickness)

        assert voxel(dwi[0]) > 3 * voxel(t1w[0])
        gap = float(dwi[0].SpacingBetweenSlices) - float(dwi[0].SliceThickness)
        assert gap == pytest.approx(0.1 * float(dwi[0].SliceThickness), abs=1e-3)

        def extent(series: list[pydicom.Dataset]) -> float:
            z = [float(ds.ImagePositionPatient[2]) for ds in series]
            return max(z) - min(z) + float(series[0].SpacingBetweenSlices)

        assert abs(extent(dwi[: len(dwi) // 2]) - extent(t1w)) <= float(
            dwi[0].SpacingBetweenSlices)
    head = acquired.scene.labels != Tissue.AIR
    shift = np.abs(acquired.shift_mm[head])
    assert 0.3 < shift.max() <= diffusion.SHIFT_CAP_MM
    assert acquired.describe()["epi_shift_max_mm"] == pytest.approx(shift.max(), abs=1e-3)
    # The anatomy moved along the phase-encoding direction, by less than a voxel mostly.
    g = acquired.geometry
    rng = np.random.default_rng(21)
    patient = sample_patient(rng, 30.0)
    straight = scene(patient, make_geometry(diffusion.grid(SITES["inst3"].grid,
                                                           acquired.protocol),
                                            g.slices, SITES["inst3"].tilt_deg, 0.5)).labels
    moved = (straight != acquired.scene.labels).mean()
    assert 0.001 < moved < 0.15


def test_default_series_rules_ignore_dwi_and_adc(cohorts):
    rules = Settings().series_rules
    for role in ("dwi", "adc"):
        ds = _series(cohorts["dwi"], "inst4", role)[0]
        header = {k: ds.get(k) for k in ("SeriesDescription", "RepetitionTime", "EchoTime",
                                          "InversionTime", "ContrastBolusAgent")}
        for rule in (rules.t1w, rules.t2w, rules.contrast_enhanced):
            assert not rule.matches(header), (role, ds.SeriesDescription)


@pytest.mark.dciodvfy
def test_dciodvfy_finds_no_errors_in_dwi_and_adc(cohorts, dciodvfy):
    folder = cohorts["dwi"] / "inst1" / "inst1-001"
    for role in ("dwi", "adc"):
        paths = sorted((folder / role).glob("*.dcm"))
        for path in (paths[0], paths[-1]):
            report = dciodvfy(path)
            assert report.ok, (path, report.errors)


def test_simulate_dwi_command_writes_dwi_and_adc_rows(tmp_path):
    out = tmp_path / "cohort"
    argv = [sys.executable, "-m", "vcemri", "simulate", "--out", str(out), "--institutions",
            "inst5", "--patients-per-institution", "1", "--randomize", "1", "--matrix-scale",
            "0.2", "--slices", "4", "--dwi", "--quiet", "--workers", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    rows = _manifest(out)
    for patient in ("SIM-INST5-001", "SIM-RANDOM-001"):
        roles = {r["role"]: r["path"] for r in rows if r["patient"] == patient}
        assert set(roles) == {"t1w", "t2w", "ce", "mask", "seg", "dwi", "adc"}
        assert len(list((out / roles["dwi"]).glob("*.dcm"))) == 2 * len(
            list((out / roles["adc"]).glob("*.dcm")))
    summary = json.loads((out / "cohort.json").read_text())
    assert summary["options"]["dwi"] is True
    assert all("dwi" in p["protocols"] for p in summary["patients"])
