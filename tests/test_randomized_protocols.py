"""Randomised protocols (``vcemri simulate --randomize``): draws inside the documented ranges,
families that can be held out, headers that say what was drawn, physics of the new families
and artefacts, reproducible cohorts, valid DICOM the node's series rules recognise."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from config import Settings, VcemriError
from simulation import SimulationOptions, simulate_cohort
from simulation.acquisition import Artefacts, make_geometry, scene
from simulation.mr_physics import sequence_factor, signal
from simulation.phantom import sample_patient
from simulation.randomized import (
    FAMILIES,
    SCANNER,
    T1W_FAMILIES,
    T2W_FAMILIES,
    draw,
    ranges_table,
)
from simulation.sites import PulseSequence
from simulation.tissues import Tissue, property_maps

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"matrix_scale": 0.2, "slices": 4}


@pytest.fixture(scope="module")
def randomized(tmp_path_factory) -> Path:
    """Six randomised patients, nothing else."""
    out = tmp_path_factory.mktemp("randomized")
    simulate_cohort(out, SimulationOptions(institutions=(), randomized=6, seed=4, **SMALL),
                    workers=2)
    return out


def _draws(count: int, families=None) -> list:
    return [draw("r", i, np.random.default_rng(i), families) for i in range(count)]


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _first(out: Path, path: str) -> pydicom.Dataset:
    return pydicom.dcmread(sorted((out / path).glob("*.dcm"))[0])


def test_draws_stay_inside_the_documented_ranges_and_cover_them():
    draws = _draws(400)
    for d in draws:
        for role, families in FAMILIES.items():
            family = families[d.families[role]]
            sequence = d.site.sequence(role)
            assert family.tr_ms[0] <= sequence.tr_ms[0] == sequence.tr_ms[1] <= family.tr_ms[1]
            assert family.te_ms[0] <= sequence.te_ms[0] <= family.te_ms[1]
            assert sequence.kind == family.kind
            assert sequence.fat_suppressed == family.fat_suppressed
            if family.ti_ms is not None:
                low, high = family.ti_ms[(1.5, 3.0).index(d.site.field_t)]
                assert low <= sequence.ti_ms <= high
        assert abs(d.site.tilt_deg) <= 15.0
        assert 192 <= d.site.grid.rows <= 512
        assert 200 <= d.site.grid.rows * d.site.grid.row_spacing_mm <= 260.5
    assert {d.families["t1w"] for d in draws} == set(T1W_FAMILIES)
    assert {d.families["t2w"] for d in draws} == set(T2W_FAMILIES)
    assert {d.site.field_t for d in draws} == {1.5, 3.0}
    assert {d.site.bits_stored for d in draws} == {12, 16}
    assert {d.site.pixel_representation for d in draws} == {0, 1}
    assert 0.3 < np.mean([d.site.rescale is not None for d in draws]) < 0.5
    assert min(d.site.tilt_deg for d in draws) < -12 and max(d.site.tilt_deg for d in draws) > 12
    assert len({d.site.manufacturer for d in draws}) == 4
    scales = [d.site.intensity_scale for d in draws]
    assert max(scales) / min(scales) > 50  # vendors' scales differ by orders of magnitude
    assert 0.2 < np.mean([d.anatomy.artefacts.dental_centre_mm is not None for d in draws]) < 0.4
    assert 0.2 < np.mean([d.anatomy.artefacts.ghost_fraction > 0 for d in draws]) < 0.4
    assert 0.1 < np.mean([d.families["ce"] != d.families["t1w"] for d in draws]) < 0.25


def test_a_held_out_family_is_never_drawn():
    # Train without gradient-echo T1w, test with nothing else: the post-contrast series
    # follows, so no GRE reaches the training cohort.
    training = _draws(300, {"t1w": ("SE", "TSE", "IR")})
    assert all(d.site.sequence(role).kind != "GRE" for d in training for role in ("t1w", "ce"))
    testing = _draws(100, {"t1w": ("GRE2D", "GRE3D"), "t2w": ("STIR",)})
    assert {d.families["t1w"] for d in testing} == {"GRE2D", "GRE3D"}
    assert all(d.site.t1w.kind == d.site.ce.kind == "GRE" for d in testing)
    assert {d.site.t2w.kind for d in testing} == {"STIR"}
    with pytest.raises(ValueError, match="unknown t1w sequence family GRE9; known: SE, TSE"):
        draw("r", 1, np.random.default_rng(0), {"t1w": ("GRE9",)})


def test_stored_values_never_clip():
    # Vendors scale so that the brightest tissue fits the stored range: whatever the draw,
    # the brightest head voxel of the T1w stays below the largest storable value.
    for d in _draws(60):
        storage_max = 2 ** (d.site.bits_stored - d.site.pixel_representation) - 1
        slope = d.site.rescale[0] if d.site.rescale else 1.0
        assert d.site.intensity_scale * 1.25 / slope <= 0.9 * storage_max + 1


def test_fat_suppression_darkens_fat_and_nothing_else():
    labels = np.array(list(Tissue), np.uint8)
    maps = property_maps(labels, 1.5)
    plain = PulseSequence("FSE", "t2", (4000, 4000), (90, 90), echo_train_length=15)
    suppressed = replace(plain, fat_suppressed=True)
    ratio = [(signal(s, 4000, 90, maps["t1_ms"], maps["t2_ms"], maps["pd"])
              * sequence_factor(s, labels)) for s in (suppressed, plain)]
    ratio = ratio[0] / np.maximum(ratio[1], 1e-9)
    assert ratio[Tissue.FAT] < 0.1
    assert 0.2 < ratio[Tissue.MARROW] < 0.6
    for tissue in (Tissue.MUSCLE, Tissue.TUMOUR, Tissue.CSF, Tissue.WHITE_MATTER):
        assert ratio[tissue] == pytest.approx(1.0)


def test_t1_flair_is_t1_weighted_with_dark_fluid():
    labels = np.array(list(Tissue), np.uint8)
    maps = property_maps(labels, 1.5)
    flair = PulseSequence("IR", "t1_tirm_tra", (2000, 2000), (10, 10), ti_ms=860)
    s = signal(flair, 2000, 10, maps["t1_ms"], maps["t2_ms"], maps["pd"])
    assert s[Tissue.CSF] < 0.05 * s[Tissue.WHITE_MATTER]  # TI near CSF's null point
    assert s[Tissue.WHITE_MATTER] > s[Tissue.GREY_MATTER]  # T1 ordering of the brain
    assert s[Tissue.FAT] > s[Tissue.MUSCLE]


def test_dental_artefact_voids_signal_wider_on_gradient_echo_and_ghosts_leave_the_head():
    rng = np.random.default_rng(3)
    patient = sample_patient(rng)
    from simulation.sites import Grid

    geometry = make_geometry(Grid(96, 96, 2.5, 2.5, 4.0), 20)
    acquired = scene(patient, geometry)
    artefacts = Artefacts(dental_centre_mm=(0.0, -58.0, -30.0), dental_radius_mm=10.0,
                          ghost_fraction=0.1, ghost_shift=0.3)
    spin = PulseSequence("SE", "t1", (500, 500), (10, 10))
    gradient = PulseSequence("GRE", "t1", (6, 6), (2, 2), flip_deg=12)
    voids = {s.kind: artefacts.susceptibility(acquired, patient, s) for s in (spin, gradient)}
    assert voids["SE"].min() < 0.1 and voids["SE"].max() > 1.2  # a void with a bright rim
    assert (voids["GRE"] < 0.5).sum() > 3 * (voids["SE"] < 0.5).sum()
    assert Artefacts().susceptibility(acquired, patient, spin) == 1.0
    image = (acquired.labels != Tissue.AIR).astype(np.float32)
    ghosted = artefacts.ghosts(image)
    outside = image == 0
    # Two copies, each half the fraction, one on each side along the rows; none along columns.
    assert np.allclose(np.unique(ghosted[outside]), [0.0, 0.05, 0.1])
    assert np.all(ghosted >= image)
    shift = round(96 * 0.3)
    copies = np.roll(image, shift, 1) + np.roll(image, -shift, 1)
    assert np.allclose(ghosted - image, 0.05 * copies)


def test_a_randomised_cohort_records_its_draws_in_the_headers(randomized):
    rows = _rows(randomized)
    patients = {p["patient"]: p for p in json.loads((randomized / "cohort.json").read_text())[
        "patients"]}
    assert len(patients) == 6 and {r["institution"] for r in rows} == {"random"}
    for row in (r for r in rows if r["role"] in ("t1w", "t2w", "ce")):
        drawn = patients[row["patient"]]["randomized"]
        ds = _first(randomized, row["path"])
        sequence = drawn[row["role"]]
        assert ds.Manufacturer == drawn["manufacturer"]
        assert float(ds.MagneticFieldStrength) == drawn["field_t"]
        assert ds.SeriesDescription == sequence["description"]
        assert ds.PixelRepresentation == drawn["pixel_representation"]
        assert ds.BitsStored == drawn["bits_stored"]
        assert ("RescaleSlope" in ds) == (drawn["rescale"] is not None)
        assert ("InversionTime" in ds) == ("ti_ms" in sequence)
        assert ("FS" in ds.get("ScanOptions", "")) == sequence["fat_suppressed"]
        normal = np.cross(*np.reshape(np.asarray(ds.ImageOrientationPatient, float), (2, 3)))
        tilt = np.degrees(np.arctan2(normal[1], normal[2]))
        assert tilt == pytest.approx(drawn["tilt_deg"], abs=0.01)
        assert ds.InstitutionName.startswith("Simulated") and str(ds.PatientName).startswith("SIM^")


def test_the_same_seed_writes_the_same_randomised_cohort(tmp_path, randomized):
    again = tmp_path / "again"
    simulate_cohort(again, SimulationOptions(institutions=(), randomized=2, seed=4, **SMALL))
    for row in _rows(again):
        if row["role"] in ("t1w", "t2w", "ce", "seg"):
            first = sorted((randomized / row["path"]).glob("*.dcm")) or [randomized / row["path"]]
            second = sorted((again / row["path"]).glob("*.dcm")) or [again / row["path"]]
            assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_default_series_rules_recognize_every_randomised_series(randomized):
    rules = Settings().series_rules
    for patient in {r["patient"] for r in _rows(randomized)}:
        paths = {r["role"]: r["path"] for r in _rows(randomized) if r["patient"] == patient}
        found = {}
        for role, rule in (("t1w", rules.t1w), ("t2w", rules.t2w),
                           ("ce", rules.contrast_enhanced)):
            for candidate in ("t1w", "t2w", "ce"):
                ds = _first(randomized, paths[candidate])
                header = {k: ds.get(k) for k in ("SeriesDescription", "RepetitionTime",
                                                  "EchoTime", "InversionTime",
                                                  "ContrastBolusAgent")}
                if rule.matches(header):
                    found.setdefault(role, []).append(candidate)
        assert found == {"t1w": ["t1w"], "t2w": ["t2w"], "ce": ["ce"]}, patient


@pytest.mark.dciodvfy
def test_dciodvfy_finds_no_errors_in_randomised_series(tmp_path, dciodvfy):
    # One patient of each new kind: a T1-FLAIR with a fat-suppressed T2w, and a STIR.
    out = tmp_path / "c"
    simulate_cohort(out, SimulationOptions(
        institutions=(), randomized=2, seed=1, families=(("t1w", ("IR",)),
                                                         ("t2w", ("TSE-FS", "STIR"))),
        **SMALL))
    paths = [r["path"] for r in _rows(out) if r["role"] in ("t1w", "t2w", "ce", "seg")]
    for path in paths:
        target = out / path
        report = dciodvfy(sorted(target.glob("*.dcm"))[0] if target.is_dir() else target)
        assert report.ok, (path, report.errors)


def test_the_ranges_page_is_generated_from_the_code():
    page = ROOT / "docs" / "randomized-protocols.md"
    assert page.read_text() == ranges_table(), "regenerate: python -m simulation.randomized " \
        "> docs/randomized-protocols.md"
    assert SCANNER["oblique tilt"].low == -15.0


def test_simulate_randomize_command(tmp_path):
    out = tmp_path / "c"
    argv = [sys.executable, "-m", "vcemri", "simulate", "--out", str(out), "--institutions",
            "inst5", "--patients-per-institution", "1", "--randomize", "2", "--random-name",
            "heldout", "--t1w-families", "GRE2D,GRE3D", "--matrix-scale", "0.2", "--slices",
            "3", "--quiet", "--workers", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "simulated 3 patients from 1 institutions and 2 with randomised protocols" in \
        done.stdout
    assert {r["institution"] for r in _rows(out)} == {"inst5", "heldout"}
    drawn = [p["randomized"] for p in json.loads((out / "cohort.json").read_text())["patients"]
             if p["randomized"]]
    assert [d["families"]["t1w"] in ("GRE2D", "GRE3D") for d in drawn] == [True, True]
    bad = subprocess.run(argv[:5] + [str(tmp_path / "x"), "--randomize", "1",
                                     "--t2w-families", "FLAIR"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2
    assert "unknown t2w sequence family FLAIR; known: TSE, TSE-FS, STIR" in bad.stderr


def test_random_groups_deal_the_same_patients_to_several_institutions(tmp_path, randomized):
    grouped = tmp_path / "grouped"
    simulate_cohort(grouped, SimulationOptions(institutions=(), randomized=4, random_groups=2,
                                               seed=4, **SMALL))
    assert [r["institution"] for r in _rows(grouped) if r["role"] == "t1w"] == [
        "random1", "random2", "random1", "random2"]

    def draws(out: Path) -> list[dict]:
        patients = json.loads((out / "cohort.json").read_text())["patients"]
        return [p["randomized"] for p in patients][:4]

    assert draws(grouped) == draws(randomized)
    with pytest.raises(VcemriError, match="5 groups of randomised patients"):
        SimulationOptions(institutions=(), randomized=4, random_groups=5)


def test_every_randomised_patient_passes_the_training_data_checks(randomized, tmp_path):
    # Series on their own grid keep the T1w's field of view and slab: training's pair,
    # geometry and coverage checks accept every patient.
    from synthesis import Normalization
    from training.dataset import prepare, read_manifest

    patients = json.loads((randomized / "cohort.json").read_text())["patients"]
    assert any(p["randomized"]["t2w_grid"] for p in patients)
    cache = prepare(read_manifest(randomized / "manifest.csv"), tmp_path,
                    Normalization("zscore", "patient"))
    assert len(cache.patients) == len(patients)
