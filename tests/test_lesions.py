"""Seed 004's tumour augmentation (``vcemri simulate --lesions N``): concentric spheres ->
lesion mask in soft tissue -> quantised intensity map -> a lesion the physics images alike in
T1w, T2w and CE-T1w; the rest of the patient unchanged."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from simulation import SimulationOptions, simulate_cohort
from simulation.acquisition import acquire, draw_protocols, make_geometry, scene
from simulation.lesions import (
    LEVELS,
    RADIUS_MM,
    ConcentricSpheres,
    Lesion,
    sample_lesion,
    spheres_from_tumour,
)
from simulation.phantom import sample_patient
from simulation.sites import SITES, Grid
from simulation.tissues import Tissue


def _lesion(morphology="necrotic", uptake=(0.9, 0.2, None), radius=12.0, lobulation=0.0):
    return Lesion("level II node", ConcentricSpheres((40.0, 8.0, -40.0), radius, (0.7, 0.4)),
                  morphology, uptake, lobulation, (0.0, 0.0, 0.0))


def test_the_quantised_map_follows_the_concentric_spheres():
    lesion = _lesion()
    # Radii 12 mm, 0.7 x 12 = 8.4 mm and 0.4 x 12 = 4.8 mm.
    along = np.array([[40.0 + r, 8.0, -40.0] for r in (0.0, 4.7, 4.9, 8.3, 8.5, 11.9, 12.1)],
                     np.float32)
    levels = lesion.levels(along, np.zeros(len(along), np.float32))
    assert levels.tolist() == [1.0, 1.0, 0.75, 0.75, 0.5, 0.5, 0.0]
    lobulated = replace(lesion, lobulation=0.2)
    bulge = lobulated.levels(along[-1:], np.ones(1, np.float32))  # the radius grows by 20 %
    assert bulge.tolist() == [0.5]


def test_sampled_lesions_cover_rare_sizes_every_morphology_and_site():
    rng = np.random.default_rng(0)
    lesions = [sample_lesion(rng) for _ in range(400)]
    radii = np.array([lesion.spheres.radius_mm for lesion in lesions])
    assert RADIUS_MM[0] <= radii.min() < 3.5 and 26 < radii.max() <= RADIUS_MM[1]
    assert {lesion.morphology for lesion in lesions} == {"solid", "rim", "necrotic",
                                                          "heterogeneous"}
    assert len({lesion.site for lesion in lesions}) == 5
    for lesion in lesions:
        middle, inner = lesion.spheres.ratios
        assert 0 < inner < middle < 1
        assert (lesion.uptake[2] is None) == (lesion.morphology == "necrotic")


def test_a_lesion_grows_in_soft_tissue_and_its_levels_enhance_differently():
    rng = np.random.default_rng(2)
    plain = sample_patient(rng, tumour_diameter_mm=12.0)
    patient = replace(plain, lesions=(_lesion(),))
    site = SITES["inst5"]
    geometry = make_geometry(Grid(128, 128, 1.6, 1.6, 2.0), 30)
    shifted = replace(geometry, positions=geometry.positions + np.array([0.0, 0.0, -48.0]))
    acquired = scene(patient, shifted)
    protocols = draw_protocols(site, rng)
    t1 = acquire(acquired, patient, site, "t1w", protocols["t1w"], 1.0, rng)
    ce = acquire(acquired, patient, site, "ce", protocols["ce"], 1.0, rng, protocols["t1w"])
    labels = acquired.labels
    points = patient.to_canonical(shifted.points()).reshape(*labels.shape, 3)
    d = np.linalg.norm(points - np.array([40.0, 8.0, -40.0], np.float32), axis=-1)
    before = scene(plain, shifted)
    added = acquired.tumour & ~before.tumour
    assert added.sum() > 200 and (d[added] < 12.6).all()  # sub-planes: +-0.5 mm
    # Only soft tissue became lesion (seed 004's G_binary keeps a tumour to its anatomy).
    for painted, plain_plane in zip(acquired.planes, before.planes, strict=True):
        grown = painted.tumour & ~plain_plane.tumour
        assert np.isin(plain_plane.labels[grown], (Tissue.FAT, Tissue.MUSCLE, Tissue.MUCOSA,
                                                   Tissue.PAROTID)).all()
    core = (d < 4.0) & (labels == Tissue.NECROSIS)
    rim = (d > 9.0) & (d < 11.0) & (labels == Tissue.TUMOUR)
    assert core.sum() > 20 and rim.sum() > 50
    # A necrotic core does not enhance; the strongly enhancing outer shell does.
    assert ce[rim].mean() / t1[rim].mean() > 1.5 * ce[core].mean() / t1[core].mean()


def test_lesions_change_nothing_but_the_lesions(tmp_path):
    from scipy import ndimage

    plain, painted = tmp_path / "plain", tmp_path / "painted"
    common = {"institutions": ("inst5",), "patients_per_institution": 1, "seed": 9,
              "matrix_scale": 0.3, "slices": 16}
    simulate_cohort(plain, SimulationOptions(**common))
    simulate_cohort(painted, SimulationOptions(**common, lesions=3))
    record = json.loads((painted / "cohort.json").read_text())["patients"][0]
    assert len(record["lesions"]) == 3
    assert json.loads((plain / "cohort.json").read_text())["patients"][0]["lesions"] == []

    def volume(out: Path, name: str) -> np.ndarray:
        reader = sitk.ImageSeriesReader()
        folder = out / "inst5" / "inst5-001" / name
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        return sitk.GetArrayFromImage(reader.Execute())

    def mask(out: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(out / "inst5" / "inst5-001" /
                                                         "tumour.nii.gz"))).astype(bool)

    added = mask(painted) & ~mask(plain)
    assert added.sum() > 0  # the ground truth holds the new lesions
    untouched = ~ndimage.binary_dilation(mask(painted) | mask(plain), iterations=3)
    for role in ("t1w", "t2w", "ce"):
        a, b = volume(plain, role), volume(painted, role)
        change = np.abs(a.astype(float) - b.astype(float))
        # Away from the lesions the same noise: only its level, set by the head's mean
        # signal, moves by a hair (at most one stored unit after rounding).
        assert change[untouched].max() <= 1.0 and change[untouched].mean() < 0.1, role
        assert change[added].mean() > 10.0, role


def test_volume_match_recovers_the_spheres_of_a_quantised_tumour():
    # Seed 004 FIG. 4: three intensity classes in shells of known radii -> three spheres.
    axis = np.arange(-20, 21, dtype=np.float32)
    points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3) + 5.0
    r = np.linalg.norm(points - 5.0, axis=1)
    inside = r <= 15.0
    values = np.where(r <= 6.0, 900.0, np.where(r <= 10.5, 600.0, 300.0))[inside]
    values = values + np.random.default_rng(0).normal(0, 20, values.shape)
    spheres = spheres_from_tumour(values, points[inside], voxel_mm3=1.0)
    assert spheres.centre == pytest.approx((5.0, 5.0, 5.0), abs=0.05)
    assert spheres.radius_mm == pytest.approx(15.0, rel=0.03)
    assert spheres.ratios == pytest.approx((10.5 / 15.0, 6.0 / 15.0), rel=0.04)
    assert LEVELS == (0.5, 0.75, 1.0)
