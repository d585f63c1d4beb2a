"""Metrics against reference implementations (scikit-image) and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from training.metrics import L_SEED000, ssim_map, study_metrics


def test_ssim_matches_scikit_image_away_from_the_border():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 4000, (64, 56))
    prediction = truth + rng.normal(0, 250, truth.shape)
    _, reference = structural_similarity(truth, prediction, data_range=L_SEED000,
                                         gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, full=True)
    ours = ssim_map(truth, prediction, L_SEED000)
    np.testing.assert_allclose(ours[5:-5, 5:-5], reference[5:-5, 5:-5], atol=1e-10)
    stack = ssim_map(np.stack([truth, truth[::-1]]), np.stack([prediction, prediction[::-1]]),
                     L_SEED000)
    np.testing.assert_allclose(stack[0], ours, atol=1e-12)  # slices are kept apart
    np.testing.assert_allclose(stack[1], ssim_map(truth[::-1], prediction[::-1], L_SEED000),
                               atol=1e-12)


def test_hand_computed_cases():
    truth = np.zeros((2, 8, 8))
    truth[:, 2:6, 2:6] = 100.0
    prediction = truth + 10.0  # every pixel off by 10
    tumour = np.zeros(truth.shape, bool)
    tumour[1, 3:5, 3:5] = True
    m = study_metrics(truth, prediction, tumour)
    assert m["seed000_whole_mae"] == pytest.approx(10.0)
    assert m["seed000_whole_mse"] == pytest.approx(100.0)
    assert m["seed000_whole_psnr"] == pytest.approx(10 * np.log10(4095**2 / 100.0))
    assert m["seed000_tumour_mae"] == pytest.approx(10.0)
    # seed 001: rescaled by the truth's range (0-100): off by 0.1 -> MAE x1e3 = 100 (clipped
    # to [0, 1] where the prediction exceeds 1: the 16 head pixels are at 1.0, error 0).
    assert m["seed001_whole_mae_x1000"] == pytest.approx(100.0 * 48 / 64)
    identical = study_metrics(truth, truth.copy(), tumour)
    assert identical["seed000_whole_ssim"] == pytest.approx(1.0)
    assert identical["seed000_whole_mae"] == 0.0


def test_psnr_matches_scikit_image():
    rng = np.random.default_rng(1)
    truth = rng.uniform(0, 1, (3, 16, 16))
    prediction = np.clip(truth + rng.normal(0, 0.05, truth.shape), 0, 1)
    m = study_metrics(truth, prediction)
    expected = np.mean([peak_signal_noise_ratio(truth[k], prediction[k], data_range=4095)
                        for k in range(3)])
    assert m["seed000_whole_psnr"] == pytest.approx(expected)
    assert np.isnan(m["seed000_tumour_mae"])  # no tumour mask given
