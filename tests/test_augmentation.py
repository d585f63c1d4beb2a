"""Training augmentation (training/augmentation.py): seeded per slice, geometry shared by the
inputs and the target, contrast changes that keep each input in its normalised units."""

from __future__ import annotations

import numpy as np

from training.augmentation import Augmentation


def _phantom(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two inputs and a target with the same bright off-centre square (the 'tumour'),
    z-scored like the trainer's slices."""
    inputs = rng.normal(0.0, 0.05, (2, 96, 80)).astype(np.float32)
    target = rng.normal(0.0, 0.05, (96, 80)).astype(np.float32)
    inputs[:, 20:36, 46:62] += 3.0
    target[20:36, 46:62] += 3.0
    inputs = (inputs - inputs.mean(axis=(1, 2), keepdims=True)) / inputs.std(axis=(1, 2),
                                                                             keepdims=True)
    return inputs, target


def _centroid(image: np.ndarray) -> np.ndarray:
    bright = image > image.mean() + 1.5 * image.std()
    return np.argwhere(bright).mean(axis=0)


def test_the_same_slice_and_epoch_give_the_same_draws_and_other_keys_other_draws():
    inputs, target = _phantom(np.random.default_rng(0))
    augmentation = Augmentation(seed=3, probability=0.5)
    first = augmentation.sample(inputs, target, (1, 17))
    again = Augmentation(seed=3, probability=0.5).sample(inputs, target, (1, 17))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    others = [augmentation.sample(inputs, target, (epoch, 17))[0] for epoch in range(2, 8)]
    assert sum(not np.array_equal(first[0], other) for other in others) >= 5
    assert not np.array_equal(first[0], Augmentation(seed=4, probability=0.5).sample(
        inputs, target, (1, 17))[0])


def test_geometry_moves_inputs_and_target_together_and_contrast_keeps_the_units():
    rng = np.random.default_rng(1)
    inputs, target = _phantom(rng)
    augmentation = Augmentation(seed=0, probability=1.0)
    moved = 0
    for key in range(12):
        x, y = augmentation.sample(inputs, target, (1, key))
        assert x.shape == inputs.shape and y.shape == target.shape
        assert np.isfinite(x).all() and np.isfinite(y).all()
        # the square is where the target has it, in both inputs (registration kept): the
        # brightest pixels of each input, as many as the target's square has, are mostly in it
        square = y > 1.5
        for channel in x:
            brightest = channel > np.quantile(channel, 1.0 - square.mean())
            assert (brightest & square).sum() > 0.7 * square.sum()
        moved += np.abs(_centroid(y) - _centroid(target)).max() > 0.5
    assert moved >= 6  # geometry acted on most samples
    contrast = Augmentation(seed=0, probability=1.0, geometry=False)
    for key in range(6):
        x, y = contrast.sample(inputs, target, (1, key))
        np.testing.assert_array_equal(y, target)  # the target is never touched
        # each input keeps its slice mean and SD (the per-patient z-score's units) ...
        np.testing.assert_allclose(x.mean(axis=(1, 2)), inputs.mean(axis=(1, 2)), atol=1e-4)
        np.testing.assert_allclose(x.std(axis=(1, 2)), inputs.std(axis=(1, 2)), rtol=1e-3)
        # ... and its contrast changed: the inputs are no longer what was acquired
        assert np.abs(x - inputs).mean() > 0.05


def test_probability_zero_changes_nothing():
    inputs, target = _phantom(np.random.default_rng(2))
    x, y = Augmentation(seed=0, probability=0.0).sample(inputs, target, (1, 0))
    np.testing.assert_allclose(x, inputs, atol=1e-5)
    np.testing.assert_array_equal(y, target)
