"""Preprocessing, normalization and EDM: geometry kept through the model grid, background
noise removed, normalizations that invert, and EDM's property under each normalization."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from synthesis.edm import apply as apply_edm
from synthesis.edm import dataset_mean, factors
from synthesis.normalization import TARGET_HEADROOM, Normalization, Statistics
from synthesis.preprocess import (
    PAD_MULTIPLE,
    GridPolicy,
    foreground,
    from_canvas,
    from_model_grid,
    remove_background,
    to_canvas,
    to_model_grid,
)


def _blob(rows: int, cols: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    r, c = np.mgrid[0:rows, 0:cols]
    return (((r - centre[0]) ** 2 + (c - centre[1]) ** 2) < radius**2).astype(np.float32)


@pytest.mark.parametrize(("rows", "cols"), [(256, 256), (320, 320), (512, 512), (288, 260),
                                            (180, 150)])
def test_resample_to_model_grid_and_back_keeps_geometry(rows, cols):
    centre = (rows * 0.37, cols * 0.61)
    image = _blob(rows, cols, centre, min(rows, cols) * 0.08)[None]
    model = to_model_grid(image)
    assert tuple(model.shape) == (1, 256, 224)
    back = from_model_grid(model, rows, cols).numpy()[0]
    assert back.shape == (rows, cols)
    before = np.array(ndimage.center_of_mass(image[0]))
    after = np.array(ndimage.center_of_mass(back))
    assert np.abs(after - before).max() <= 0.5  # within half a voxel
    # In the model grid the blob sits at the same fraction of the field of view.
    fraction = np.array(ndimage.center_of_mass(model.numpy()[0])) + 0.5
    np.testing.assert_allclose(fraction / [256, 224], (before + 0.5) / [rows, cols], atol=0.01)


def _pattern(rows: int, cols: int, cycles: float) -> np.ndarray:
    """A smooth pattern of ``cycles`` periods across the field of view, sampled at the pixel
    centres of a rows x cols grid."""
    y = (np.arange(rows) + 0.5) / rows
    x = (np.arange(cols) + 0.5) / cols
    return (np.sin(2 * np.pi * cycles * x)[None] * np.cos(2 * np.pi * cycles * y)[:, None])


@pytest.mark.parametrize(("rows", "cols"), [(320, 320), (288, 260), (256, 256)])
def test_the_way_back_restores_smooth_detail_much_better_than_bilinear(rows, cols):
    model = _pattern(256, 224, 10)[None].astype(np.float32)
    truth = _pattern(rows, cols, 10)
    back = from_model_grid(model, rows, cols).numpy()[0]
    bilinear = to_model_grid(model, rows, cols).numpy()[0]
    inner = (slice(4, -4), slice(4, -4))
    error = np.abs(back - truth)[inner].max()
    assert error < 0.004
    assert error < np.abs(bilinear - truth)[inner].max() / 3


def test_the_way_back_keeps_channels_and_slices_apart():
    planes = [np.full((256, 224), k, np.float32) for k in range(6)]
    slices = np.stack(planes).reshape(3, 2, 256, 224)
    back = from_model_grid(slices, 300, 200).numpy()
    assert back.shape == (3, 2, 300, 200)
    np.testing.assert_allclose(back, slices[..., :1, :1] * np.ones((300, 200)), atol=1e-4)


def _disk_mm(rows: int, cols: int, spacing: float, centre_mm: tuple[float, float],
             radius_mm: float) -> np.ndarray:
    """A disk of ``radius_mm`` at ``centre_mm`` from the field's corner, sampled at the pixel
    centres of a rows x cols acquisition with ``spacing`` mm pixels."""
    r, c = (np.mgrid[0:rows, 0:cols] + 0.5) * spacing
    return (np.hypot(r - centre_mm[0], c - centre_mm[1]) < radius_mm).astype(np.float32)


def test_a_fixed_spacing_shows_the_same_anatomy_at_the_same_size_whatever_the_matrix():
    """At a fixed pixel spacing a 40 mm disk spans the same pixels whether it was acquired at
    0.72 mm (320 matrix) or 0.9375 mm (256 x 224); on the seeds' 256 x 224 matrix the same
    disk is stretched differently by each field of view."""
    policy = GridPolicy(320, 320, 0.8)
    canvases, stretched = [], []
    for rows, cols, spacing in ((320, 320, 0.72), (256, 224, 0.9375)):
        field = (rows * spacing, cols * spacing)
        disk = _disk_mm(rows, cols, spacing, (field[0] / 2, field[1] / 2), 20.0)[None]
        placement = policy.place(disk.shape, (spacing, spacing))
        assert placement.canvas == (320, 320)
        assert placement.inner == (round(field[0] / 0.8), round(field[1] / 0.8))
        canvas = to_canvas(disk, placement, fill=-1.0).numpy()[0]
        canvases.append(canvas)
        stretched.append(to_model_grid(disk).numpy()[0])
        # outside the field of view: the fill; the way back returns the acquisition
        assert canvas[0, 0] == -1.0
        back = from_canvas(canvas[None], placement).numpy()[0]
        assert back.shape == (rows, cols)
        assert np.abs(back - disk[0]).mean() < 0.01
    area = [float((c > 0.5).sum()) * 0.8**2 for c in canvases]
    np.testing.assert_allclose(area, np.pi * 20.0**2, rtol=0.03)
    disks = [np.clip(c, 0.0, None) for c in canvases]  # the fields differ; the disk does not
    assert np.abs(disks[0] - disks[1]).sum() < 0.05 * disks[0].sum()
    widths = [int((s > 0.5).any(0).sum()) for s in stretched]
    assert widths[0] != widths[1]  # 224 columns over 230 mm and over 210 mm


def test_a_canvas_grows_by_whole_multiples_for_a_wider_field():
    policy = GridPolicy.fitting(0.8, [(230.0, 230.0), (220.0, 187.0)])
    assert (policy.rows, policy.columns) == (288, 288)
    assert policy.describe() == "0.8 mm pixels on a 288 x 288 canvas"
    wide = policy.place((1, 400, 300), (0.65, 0.65))  # 260 x 195 mm
    assert wide.inner == (325, 244)
    assert wide.canvas == (352, 288) and wide.canvas[0] % PAD_MULTIPLE == 0
    assert policy.place((1, 400, 300), (0.65, 0.65), grow=False).canvas == (288, 288)
    seeds = GridPolicy()
    assert seeds.place((1, 320, 320), (0.72, 0.72)).inner == (256, 224)
    assert seeds.describe() == "256 x 224 matrix"


def test_triangle_threshold_removes_background_noise_only():
    rng = np.random.default_rng(0)
    head = np.stack([_blob(96, 80, (48, 40), 30)] * 4)
    head[:, 44:52, 36:44] = 0.0  # a dark airway inside the head
    noisy = np.hypot(head * 300 + rng.normal(0, 12, head.shape), rng.normal(0, 12, head.shape))
    mask = foreground(noisy)
    cleaned = remove_background(noisy, mask)
    outside = ndimage.binary_dilation(head > 0, iterations=3) == 0
    assert (cleaned[outside] == 0).mean() > 0.99
    assert mask[:, 46:50, 38:42].all()  # the airway is kept (holes filled)
    inside = ndimage.binary_erosion(head > 0, iterations=2)
    np.testing.assert_array_equal(cleaned[inside], noisy[inside].astype(np.float32))


def _volume(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    volume = rng.gamma(4.0, 50.0, (6, 32, 28)).astype(np.float32)
    mask = np.zeros(volume.shape, bool)
    mask[:, 4:28, 4:24] = True
    return volume, mask


@pytest.mark.parametrize("method", ["zscore", "minmax"])
@pytest.mark.parametrize("level", ["patient", "image", "dataset"])
def test_normalization_inverts(method, level):
    rng = np.random.default_rng(1)
    volume, mask = _volume(rng)
    norm = Normalization(method, level)
    dataset = Statistics(190.0, 90.0, 0.0, 2000.0)
    stats = norm.statistics(volume, mask, dataset)
    normalized = norm.normalize_volume(volume, stats)
    restored = np.stack([norm.inverse(s, st, target=False)
                         for s, st in zip(normalized, stats, strict=True)])
    np.testing.assert_allclose(restored, volume, rtol=1e-4, atol=1e-2)


def test_patient_zscore_and_minmax_ranges():
    rng = np.random.default_rng(2)
    volume, mask = _volume(rng)
    z = Normalization("zscore", "patient")
    out = z.normalize_volume(volume, z.statistics(volume, mask))
    assert out[mask].mean() == pytest.approx(0.0, abs=1e-4)
    assert out[mask].std() == pytest.approx(1.0, abs=1e-4)
    m = Normalization("minmax", "image")
    out = m.normalize_volume(volume, m.statistics(volume, mask))
    for k in range(len(volume)):
        assert out[k][mask[k]].min() == pytest.approx(-1.0)
        assert out[k][mask[k]].max() == pytest.approx(1.0)
    assert m.output == "tanh" and z.output == "linear"


def test_ce_target_uses_t1w_statistics_and_maps_back():
    rng = np.random.default_rng(3)
    t1, mask = _volume(rng)
    ce = t1 * 1.8
    for method in ("zscore", "minmax"):
        norm = Normalization(method, "patient")
        stats = norm.statistics(t1, mask)
        target = norm.normalize_volume(ce, stats, target=True)
        if method == "minmax":  # CE up to TARGET_HEADROOM T1w ranges stays inside [-1, 1]
            assert target[mask].max() <= 1.0 and 1.8 <= TARGET_HEADROOM
        np.testing.assert_allclose(norm.restore_volume(target, stats), ce, rtol=1e-4, atol=1e-2)


def test_edm_is_an_identity_under_patient_zscore_and_matters_under_dataset_level():
    rng = np.random.default_rng(4)
    training, mask = _volume(rng)
    external = training * 3.7  # the same anatomy from a scanner with 3.7x the scale
    mu1 = dataset_mean([training[mask].mean()])
    mu2 = dataset_mean([external[mask].mean()])
    edm = factors({"t1w": mu1, "t2w": mu1}, {"t1w": mu2, "t2w": mu2}, "inst1")
    matched = apply_edm(external, edm.t1w)
    np.testing.assert_allclose(matched, training, rtol=1e-5)
    assert edm.t1w == pytest.approx(1 / 3.7)

    patient = Normalization("zscore", "patient")
    before = patient.normalize_volume(external, patient.statistics(external, mask))
    after = patient.normalize_volume(matched, patient.statistics(matched, mask))
    np.testing.assert_allclose(before, after, atol=1e-4)  # EDM changes nothing here

    dataset = Normalization("zscore", "dataset")
    stats = Statistics.of(training[mask])
    before = dataset.normalize_volume(external, dataset.statistics(external, mask, stats))
    after = dataset.normalize_volume(matched, dataset.statistics(matched, mask, stats))
    reference = dataset.normalize_volume(training, dataset.statistics(training, mask, stats))
    assert np.abs(before - reference).mean() > 1.0  # unmatched external data is far off
    np.testing.assert_allclose(after, reference, atol=1e-4)  # EDM brings it back


def test_edm_refuses_a_non_positive_mean():
    with pytest.raises(ValueError, match="positive mean"):
        factors({"t1w": 1.0, "t2w": 1.0}, {"t1w": 0.0, "t2w": 1.0}, "inst1")


def test_pooled_statistics():
    a, b = np.arange(10.0), np.arange(10.0, 30.0)
    pooled = Statistics.pooled([Statistics.of(a), Statistics.of(b)], [10, 20])
    both = Statistics.of(np.concatenate([a, b]))
    assert pooled.mean == pytest.approx(both.mean)
    assert pooled.std == pytest.approx(both.std)
