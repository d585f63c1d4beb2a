"""Intensity normalization, at the three levels and with the two methods the seeds compare
(seed 001 eq. 1-2; seed 000 claims z-score per subject), and its way back to scanner units.

- method ``zscore``: (x - mean) / std; ``minmax``: 2 (x - min) / (max - min) - 1, i.e. [-1, 1]
  for the tanh output (seed 000 scales to [-1, 1]).
- level ``patient``: statistics of the patient's volume; ``image``: of each 2D slice;
  ``dataset``: of the training set, stored in the model.
- Statistics are taken over the head (the triangle-threshold foreground), so that fields of
  view with more or less air do not change them.
- The contrast-enhanced target is normalized with the *T1w's* statistics, which exist at
  inference, so the model's output maps back to the T1w's scanner units. With ``minmax`` the
  target range is widened by :data:`TARGET_HEADROOM` (enhancement goes above the T1w's
  maximum). Our choice; the seeds do not say.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Method = Literal["zscore", "minmax"]
Level = Literal["patient", "image", "dataset"]

#: minmax only: the CE target may reach this many T1w ranges above the T1w minimum.
TARGET_HEADROOM = 2.0

#: Every normalization by name, METHOD-LEVEL (seed 001 compares these six).
NORMALIZATIONS = tuple(f"{m}-{lv}" for m in ("zscore", "minmax")
                       for lv in ("patient", "image", "dataset"))


@dataclass(frozen=True)
class Statistics:
    """Intensity statistics over the head: mean, std, min, max (scanner units)."""

    mean: float
    std: float
    minimum: float
    maximum: float

    @staticmethod
    def of(values: np.ndarray) -> Statistics:
        values = np.asarray(values, np.float64)
        if values.size == 0:
            return Statistics(0.0, 1.0, 0.0, 1.0)
        return Statistics(float(values.mean()), float(values.std()), float(values.min()),
                          float(values.max()))

    @staticmethod
    def pooled(parts: list[Statistics], weights: list[float]) -> Statistics:
        """Statistics of several groups pooled (mean and variance weighted by count)."""
        w = np.asarray(weights, float)
        means = np.array([p.mean for p in parts])
        mean = float((w * means).sum() / w.sum())
        variance = float((w * (np.array([p.std for p in parts]) ** 2 + (means - mean) ** 2)).sum()
                         / w.sum())
        return Statistics(mean, variance**0.5, min(p.minimum for p in parts),
                          max(p.maximum for p in parts))

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Normalization:
    """How intensities are normalized; stored in checkpoints."""

    method: Method = "zscore"
    level: Level = "patient"

    @staticmethod
    def named(name: str) -> Normalization:
        """From a name of :data:`NORMALIZATIONS`, e.g. ``minmax-dataset``."""
        if name not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {name!r} (known: "
                             f"{', '.join(NORMALIZATIONS)})")
        method, level = name.split("-")
        return Normalization(method, level)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        """METHOD-LEVEL, as :meth:`named` reads it."""
        return f"{self.method}-{self.level}"

    def _affine(self, stats: Statistics, target: bool) -> tuple[float, float]:
        """(scale, offset) with normalized = (x - offset) / scale."""
        if self.method == "zscore":
            return max(stats.std, 1e-6), stats.mean
        span = max(stats.maximum - stats.minimum, 1e-6) * (TARGET_HEADROOM if target else 1.0)
        return span / 2.0, stats.minimum + span / 2.0

    def forward(self, x: np.ndarray, stats: Statistics, target: bool = False) -> np.ndarray:
        scale, offset = self._affine(stats, target)
        return ((np.asarray(x, np.float32) - offset) / scale).astype(np.float32)

    def background(self, stats: Statistics, target: bool = False) -> float:
        """What a removed background voxel (0 in scanner units) becomes, normalised: the value
        a canvas around the field of view is padded with."""
        scale, offset = self._affine(stats, target)
        return float(np.float32(-offset) / np.float32(scale))

    def inverse(self, y: np.ndarray, stats: Statistics, target: bool = True) -> np.ndarray:
        scale, offset = self._affine(stats, target)
        return (np.asarray(y, np.float32) * scale + offset).astype(np.float32)

    @property
    def scale_invariant(self) -> bool:
        """True when multiplying a patient's intensities by a constant changes nothing the
        model sees: statistics taken per patient or per slice scale with the data, so
        (a x - a mean) / (a std) = (x - mean) / std, and likewise for min-max. Only
        dataset-level statistics, fixed in the model, let a global scale (and so EDM) through."""
        return self.level != "dataset"

    def describe(self) -> str:
        """E.g. 'per-patient z-score', 'dataset-level min-max'."""
        level = {"patient": "per-patient", "image": "per-slice", "dataset": "dataset-level"}
        method = {"zscore": "z-score", "minmax": "min-max"}
        return f"{level[self.level]} {method[self.method]}"

    @property
    def output(self) -> Literal["tanh", "linear"]:
        """The generator output this normalization needs."""
        return "tanh" if self.method == "minmax" else "linear"

    def statistics(self, volume: np.ndarray, mask: np.ndarray,
                   dataset: Statistics | None = None) -> list[Statistics]:
        """Per-slice statistics for ``volume`` (slices, rows, cols) at this level."""
        if self.level == "dataset":
            if dataset is None:
                raise ValueError("dataset-level normalization needs the training set's statistics")
            return [dataset] * len(volume)
        if self.level == "patient":
            return [Statistics.of(volume[mask])] * len(volume)
        return [Statistics.of(s[m]) for s, m in zip(volume, mask, strict=True)]

    def normalize_volume(self, volume: np.ndarray, stats: list[Statistics],
                         target: bool = False) -> np.ndarray:
        return np.stack([self.forward(s, st, target) for s, st in zip(volume, stats, strict=True)])

    def restore_volume(self, volume: np.ndarray, stats: list[Statistics]) -> np.ndarray:
        return np.stack([self.inverse(s, st) for s, st in zip(volume, stats, strict=True)])
