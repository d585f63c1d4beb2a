"""Training augmentation on the fly: the inputs of a training batch as other scanners, other
protocols and other patients' positions would have made them (``vcemri train --augment``).

Built from MONAI's array transforms (MONAI rather than TorchIO: its transforms take 2D
channel-first arrays and a seedable ``RandomState`` each, where TorchIO's work on 3D
subjects; MONAI has no ghosting transform, so that one is a k-space line modulation here, as
TorchIO's ``RandomGhosting`` does it):

- **geometry**, to inputs and target alike (the pair stays registered): rotation up to
  +-10 degrees and scaling +-10 % (``RandAffine``), smooth elastic deformation
  (``Rand2DElastic``);
- **contrast**, to each input on its own (the target stays in the T1w's normalised units, so
  the network must learn the CE-T1w whatever the inputs' contrast): random monotone contrast
  curves (``RandHistogramShift``), gamma 0.6-1.7 (``RandAdjustContrast``), a smooth
  multiplicative bias field (``RandBiasField``);
- **acquisition**: lower in-plane resolution (``RandSimulateLowResolution``, zoom 0.5-1),
  Gibbs ringing (``RandGibbsNoise``), k-space spikes (``RandKSpaceSpikeNoise``), ghosting,
  Rician noise (``RandRicianNoise``, up to 5 % of the image's SD).

Contrast and acquisition transforms work on the image shifted to be non-negative (MR
magnitudes; a bias field multiplies) and the result is brought back to the slice's mean and
SD, so an augmented input stays in the units the per-patient z-score gives at inference.
Through-plane effects (slice thickness) are not simulated: a training sample is one slice.

Every draw comes from a generator seeded by (seed, epoch, cache row): the augmentation of a
slice does not depend on which process or batch it falls in, so a resumed run and a
``torchrun`` job see exactly what an uninterrupted single process sees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

#: probability that each transform acts on a sample (independently of the others): with ten
#: transforms, about one sample in ten is left as acquired (0.8 ** 10)
PROBABILITY = 0.2


def _numpy(image: Any) -> np.ndarray:
    """A transform's output (MONAI returns tensors) as float32 numpy."""
    return np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, np.float32)


class Ghosting:
    """Ghosts along the phase-encoding direction (rows or columns, drawn): every n-th k-space
    line scaled by 1 - s, which repeats a faint copy of the image n times across the field of
    view (TorchIO's ``RandomGhosting`` does the same; MONAI has none)."""

    def __init__(self, prob: float, ghosts: tuple[int, int] = (2, 6),
                 intensity: tuple[float, float] = (0.1, 0.5)) -> None:
        self.prob, self.ghosts, self.intensity = prob, ghosts, intensity
        self.R = np.random.RandomState()

    def set_random_state(self, state: np.random.RandomState) -> None:
        self.R = state

    def __call__(self, image: Any) -> Any:
        apply = self.R.rand() < self.prob
        n = int(self.R.randint(self.ghosts[0], self.ghosts[1] + 1))
        s = float(self.R.uniform(*self.intensity))
        axis = int(self.R.randint(0, 2))
        if not apply:
            return image
        image = _numpy(image)
        k = np.fft.fftshift(np.fft.fft2(image), axes=(-2, -1))
        lines = np.arange(image.shape[-2 + axis])
        centre = lines.size // 2
        scale = np.where((lines % n == 0) & (lines != centre), 1.0 - s, 1.0)
        k = k * (scale[:, None] if axis == 0 else scale[None, :])
        return np.abs(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)))).astype(image.dtype)


class Augmentation:
    """Seeded per-slice augmentation of (inputs, target) pairs (see the module)."""

    def __init__(self, seed: int, probability: float = PROBABILITY,
                 geometry: bool = True) -> None:
        """``probability``: of each transform acting on a sample; ``geometry``: False leaves
        the anatomy where it is (contrast and acquisition transforms only)."""
        from monai import transforms as mt  # the training extra; the CLI imports this module

        self.seed = seed
        p = probability
        self.geometry = [] if not geometry else [
            mt.RandAffine(prob=p, rotate_range=math.radians(10), scale_range=(0.1, 0.1),
                          padding_mode="border"),
            mt.Rand2DElastic(spacing=(32, 32), magnitude_range=(0.0, 1.5), prob=p,
                             padding_mode="border"),
        ]
        self.contrast = [
            mt.RandHistogramShift(num_control_points=(5, 10), prob=p),
            mt.RandAdjustContrast(prob=p, gamma=(0.6, 1.7)),
            mt.RandBiasField(degree=3, coeff_range=(0.0, 0.3), prob=p),
            mt.RandSimulateLowResolution(prob=p, downsample_mode="area",
                                         upsample_mode="bilinear", zoom_range=(0.5, 1.0)),
            mt.RandGibbsNoise(prob=p, alpha=(0.0, 0.5)),
            mt.RandKSpaceSpikeNoise(prob=p / 4),
            Ghosting(prob=p / 2),
            mt.RandRicianNoise(prob=p, std=0.05, relative=True, channel_wise=True),
        ]

    def _seed(self, key: Sequence[int]) -> None:
        state = np.random.RandomState(
            np.random.SeedSequence([self.seed, *map(int, key), 13]).generate_state(1)[0])
        for transform in (*self.geometry, *self.contrast):
            transform.set_random_state(state=state)

    def _contrast(self, image: np.ndarray) -> np.ndarray:
        mean, sd = float(image.mean()), float(image.std())
        work = (image - image.min())[None]
        for transform in self.contrast:
            work = transform(work)
        out = _numpy(work)[0]
        spread = float(out.std())
        if not np.isfinite(spread) or spread < 1e-6:
            return image
        return ((out - out.mean()) / spread * sd + mean).astype(np.float32)

    def sample(self, inputs: np.ndarray, target: np.ndarray,
               key: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """One slice's inputs (C, H, W) and target (H, W) augmented with the draws of ``key``
        (e.g. (epoch, cache row))."""
        self._seed(key)
        stack = np.concatenate([inputs, target[None]]).astype(np.float32)
        for transform in self.geometry:
            stack = _numpy(transform(stack))
        inputs, target = stack[:-1], stack[-1]
        return np.stack([self._contrast(channel) for channel in inputs]), target

    def batch(self, inputs: np.ndarray, targets: np.ndarray, keys: Sequence[Sequence[int]],
              ) -> tuple[np.ndarray, np.ndarray]:
        """A batch (B, C, H, W) and its targets (B, H, W), sample b with ``keys[b]``."""
        pairs = [self.sample(x, y, key) for x, y, key in zip(inputs, targets, keys, strict=True)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
