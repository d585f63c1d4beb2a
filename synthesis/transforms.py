"""The pipeline's invertible steps, each next to its inverse (as MONAI's invertible transforms
keep them): the way from scanner units to the model's input, and the way back from the
model's output to the T1w's scanner units, cannot drift apart.

A step's ``forward`` takes the input modalities ({"t1w": ..., "t2w": ...}, (slices, rows,
columns) float32) and records what its inverse needs (statistics, factors, the grid it came
from); its ``inverse`` takes the generator's output, which is in the T1w's terms (the
contrast-enhanced target was normalized with the T1w's statistics, seed 000's "mapping back").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import edm
from .edm import EDMFactors
from .normalization import Normalization, Statistics
from .preprocess import GridPolicy, Placement, from_canvas, to_canvas

Arrays = dict[str, np.ndarray]


class InvertibleStep:
    """One step of the way there and back; ``name`` identifies it in :meth:`Chain.inverse`."""

    name = "step"

    def forward(self, arrays: Arrays) -> Arrays:
        raise NotImplementedError

    def inverse(self, output: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@dataclass
class ExternalDistributionMatching(InvertibleStep):
    """EDM (seed 000 eq. 1): each input times its factor mu1/mu2; back: the output divided by
    the T1w's factor (the output is in the T1w's scaled units)."""

    factors: EDMFactors
    name = "edm"

    def forward(self, arrays: Arrays) -> Arrays:
        # EDM matches T1w and T2w (seed 000 eq. 1); other inputs pass unchanged
        return {m: edm.apply(x, getattr(self.factors, m, 1.0)) for m, x in arrays.items()}

    def inverse(self, output: np.ndarray) -> np.ndarray:
        return (np.asarray(output, np.float32) / np.float32(self.factors.t1w)).astype(np.float32)


@dataclass
class Normalize(InvertibleStep):
    """Intensity normalization at the model's level and method, with statistics over each
    input's head ``masks`` (or the training set's, at dataset level); back: restored with the
    T1w's statistics."""

    normalization: Normalization
    masks: dict[str, np.ndarray]
    dataset: dict[str, Statistics | None] = field(default_factory=dict)
    statistics: dict[str, list[Statistics]] = field(default_factory=dict)
    name = "normalize"

    def forward(self, arrays: Arrays) -> Arrays:
        self.statistics = {m: self.normalization.statistics(x, self.masks[m],
                                                            self.dataset.get(m))
                           for m, x in arrays.items()}
        return {m: self.normalization.normalize_volume(x, self.statistics[m])
                for m, x in arrays.items()}

    def inverse(self, output: np.ndarray) -> np.ndarray:
        return self.normalization.restore_volume(output, self.statistics["t1w"])

    def background(self, modality: str) -> np.ndarray:
        """What a voxel of 0 (the removed background) becomes in ``modality``'s normalised
        units, per slice: the value a canvas is padded with."""
        return np.array([self.normalization.background(s) for s in self.statistics[modality]],
                        np.float32)


@dataclass
class ModelGrid(InvertibleStep):
    """Each slice to the network's grid as the checkpoint's ``policy`` says: the seeds' 256 x
    224 matrix (bilinear, seed 000 (B)), or a fixed pixel spacing on a canvas padded with the
    normalised background (``normalize``'s zero); back to the acquired matrix with an
    interpolating cubic B-spline (``synthesis.preprocess``)."""

    policy: GridPolicy = field(default_factory=GridPolicy)
    #: the acquired (row, column) pixel spacing, mm
    pixel_spacing: tuple[float, float] = (1.0, 1.0)
    normalize: Normalize | None = None
    placement: Placement | None = None
    name = "model grid"

    def forward(self, arrays: Arrays) -> Arrays:
        shape = next(iter(arrays.values())).shape
        self.placement = self.policy.place(shape, self.pixel_spacing)
        return {m: to_canvas(x, self.placement, self._fill(m, len(x))).numpy()
                for m, x in arrays.items()}

    def _fill(self, modality: str, slices: int) -> np.ndarray:
        if self.normalize is None or modality not in self.normalize.statistics:
            return np.zeros(slices, np.float32)
        return self.normalize.background(modality)

    def inverse(self, output: np.ndarray) -> np.ndarray:
        assert self.placement is not None, "the way back needs the way there first"
        return from_canvas(output, self.placement).numpy()


@dataclass
class Chain:
    """Steps applied in order on the way there, and in reverse on the way back."""

    steps: Sequence[InvertibleStep]

    def forward(self, arrays: Arrays) -> Arrays:
        for step in self.steps:
            arrays = step.forward(arrays)
        return arrays

    def inverse(self, output: np.ndarray, skip: Sequence[str] = ()) -> np.ndarray:
        """The way back, leaving out the steps named in ``skip`` (e.g. the model grid, to
        have the output in scanner units on the grid the network saw)."""
        for step in reversed(self.steps):
            if step.name not in skip:
                output = step.inverse(output)
        return np.asarray(output, np.float32)
