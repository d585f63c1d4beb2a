"""Input checks that need no model (synthesis.checks): every fixed site's real pairs pass, and
each fault is refused with its own reason."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from simulation import SITES, SimulationOptions, simulate_cohort
from synthesis import AcquisitionRanges, checks, clean_pair, read_series, resample_onto


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checks")
    # the sites' own coverage (~120 mm): the contrast check needs the brain's fluid in view
    simulate_cohort(out, SimulationOptions(patients_per_institution=1, matrix_scale=0.5,
                                           seed=3), workers=2)
    return out


def _pair(cohort: Path, site: str) -> tuple[dict[str, np.ndarray], np.ndarray, tuple, object]:
    folder = cohort / site / f"{site}-001"
    t1 = read_series(folder / "t1w")
    t2 = resample_onto(read_series(folder / "t2w"), t1)
    arrays = {"t1w": t1.array, "t2w": t2.array}
    _, masks = clean_pair(arrays["t1w"], arrays["t2w"])
    spacing = t1.image.GetSpacing()
    return arrays, masks["t1w"], (spacing[1], spacing[0]), (t1.info, t2.info)


@pytest.mark.parametrize("site", sorted(SITES))
def test_every_fixed_site_passes_and_its_swapped_pair_does_not(cohort, site):
    arrays, head, spacing, infos = _pair(cohort, site)
    reasons, evidence = checks.content_checks(arrays, head, spacing)
    assert reasons == [] and evidence["t1w_at_t2w_brightest"] < 1
    assert checks.header(*infos) == []
    swapped, _ = checks.content_checks({"t1w": arrays["t2w"], "t2w": arrays["t1w"]},
                                       head, spacing)
    if SITES[site].t2w.kind == "STIR":
        # both series darken the other's brightest voxels: left to the fitness classifier
        # (tests/test_shipped_model.py refuses such a pair)
        assert swapped == []
    else:
        assert len(swapped) == 1 and swapped[0].startswith("the series look swapped")


@pytest.fixture(scope="module")
def suppressed(tmp_path_factory) -> Path:
    """Randomised patients with the T2w families that darken fat (fat-suppressed TSE, STIR)
    and T1w families the fixed sites lack (T1-FLAIR, 2D spoiled gradient echo)."""
    out = tmp_path_factory.mktemp("suppressed")
    simulate_cohort(out, SimulationOptions(
        institutions=(), randomized=4, seed=5, matrix_scale=0.5,
        families=(("t1w", ("IR", "GRE2D")), ("t2w", ("TSE-FS", "STIR")))), workers=2)
    return out


def test_a_fat_suppressed_or_stir_t2w_is_not_called_swapped(suppressed):
    """Suppressed fat is dark on the T2w as fluid is on the T1w: a real pair, not a swap
    (the check refused every fat-suppressed pair before)."""
    folders = sorted(p.parent for p in suppressed.glob("*/*/t1w"))
    assert len(folders) == 4
    for folder in folders:
        t1 = read_series(folder / "t1w")
        t2 = resample_onto(read_series(folder / "t2w"), t1)
        _, masks = clean_pair(t1.array, t2.array)
        reasons, evidence = checks.contrast(t1.array, t2.array, masks["t1w"])
        assert reasons == [], (folder.name, t2.info.description, evidence)


def test_a_copy_noise_and_emptiness_are_refused(cohort):
    arrays, head, spacing, _ = _pair(cohort, "inst5")
    copied, _ = checks.content_checks({"t1w": arrays["t1w"], "t2w": arrays["t1w"] * 1.7}, head,
                                      spacing)
    assert copied == [checks.same_content(arrays["t1w"], arrays["t1w"], head)[0]]
    assert "hold the same images" in copied[0]
    rng = np.random.default_rng(0)
    noise = np.abs(rng.normal(0, arrays["t2w"][head].std(), arrays["t2w"].shape))
    noisy, _ = checks.content_checks({"t1w": arrays["t1w"], "t2w": noise}, head, spacing)
    assert len(noisy) == 1 and "the T2w holds noise, not anatomy" in noisy[0]
    empty, _ = checks.content_checks({"t1w": np.zeros_like(arrays["t1w"]),
                                      "t2w": arrays["t2w"]}, head, spacing)
    assert empty == ["the T1w is empty (no intensity variation)"]


def test_ghosts_extreme_non_uniformity_and_a_torso_are_refused(cohort):
    arrays, head, spacing, _ = _pair(cohort, "inst2")
    t1 = arrays["t1w"]
    ghosted = t1 + 0.2 * np.roll(t1, t1.shape[1] // 2, axis=1)  # an N/2 ghost, 20 %
    found, _ = checks.content_checks({"t1w": ghosted, "t2w": arrays["t2w"]}, head, spacing)
    assert any("the T1w has structured signal outside the head" in r for r in found)
    ramp = np.exp(np.log(12.0) / 2 * np.linspace(-1, 1, t1.shape[2]))[None, None, :]
    found, _ = checks.content_checks({"t1w": t1 * ramp, "t2w": arrays["t2w"]}, head, spacing)
    assert any("extreme coil non-uniformity" in r for r in found)
    wide = ndimage.zoom(head, (1, 1, 2.0), order=0)[:, :, :head.shape[2]]
    assert checks.body(np.pad(wide, ((0, 0), (0, 0), (0, 0))), (spacing[0], spacing[1] * 2.2))


def test_header_weighting_and_geometry(cohort):
    _, _, _, (t1, t2) = _pair(cohort, "inst1")
    assert checks.header_weighting(t1) == "T1" and checks.header_weighting(t2) == "T2"
    swapped_headers = checks.header(t2, t1)
    assert len(swapped_headers) == 2
    assert "has TR 7640 ms, TE 97 ms, TI 165 ms: a T2-weighted protocol" in swapped_headers[0]
    gradient = replace(t1, scanning_sequence=("GR",), repetition_time_ms=7.0, echo_time_ms=3.0)
    assert checks.header_weighting(gradient) == "T1"
    ranges = AcquisitionRanges(slice_spacing_mm=(3.0, 5.5), pixel_spacing_mm=(0.72, 0.94))
    assert checks.geometry(4.0, 0.8, ranges) == []
    far = checks.geometry(12.0, 0.2, ranges)
    assert len(far) == 2 and far[0].startswith("slice spacing 12.00 mm is far outside")
    assert checks.geometry(12.0, 0.2, AcquisitionRanges()) == []  # an older checkpoint
