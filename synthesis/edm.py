"""External distribution matching (EDM; seed 000 eq. 1, FIG. 4 and claims).

For data from an institution the model was not trained on, T1w and T2w intensities are scaled
by y = (mu1 / mu2) * x, where mu1 is the mean pixel value of the training data of the closest
training institution and mu2 that of the external data, each "the mean over patients of each
patient's mean". CE data are never needed. EDM keeps the intensity scale (unlike a z-score).

Means are taken over the head (triangle-threshold foreground). At inference a single external
study is usually all there is; mu2 is then that study's own mean unless statistics of the
external institution (several studies) are supplied.

Note (MODELS.md): a per-patient (or per-slice) z-score or min-max is invariant to a global
scale factor, so EDM only changes the model's input under dataset-level normalization. Under
the others the pipeline does not apply it and says so (:func:`not_applicable`), rather than
print factors that change nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

MODALITIES = ("t1w", "t2w")


def dataset_mean(patient_means: Iterable[float]) -> float:
    """mu: the mean over patients of each patient's mean pixel value."""
    values = [float(v) for v in patient_means]
    if not values:
        raise ValueError("no patients to average")
    return float(np.mean(values))


@dataclass(frozen=True)
class EDMFactors:
    """The factors applied, per modality (1.0 when EDM did not apply); ``note`` says why EDM
    was not applicable, when it was not."""

    t1w: float = 1.0
    t2w: float = 1.0
    applied: bool = False
    reference_institution: str | None = None
    note: str = ""

    @property
    def applicable(self) -> bool:
        return not self.note

    def line(self) -> str:
        """What the CLI, the review caption and the series' derivation say about EDM."""
        if self.note:
            return self.note
        if not self.applied:
            return "EDM not applied (known institution)"
        return (f"EDM T1w x{self.t1w:.3f}, T2w x{self.t2w:.3f} (closest training institution "
                f"{self.reference_institution})")

    def as_dict(self) -> dict[str, object]:
        return {"t1w": round(self.t1w, 6), "t2w": round(self.t2w, 6), "applied": self.applied,
                "reference_institution": self.reference_institution,
                "applicable": self.applicable, "line": self.line()}


def not_applicable(normalization: str) -> EDMFactors:
    """Identity factors that say EDM cannot change a ``normalization`` that is scale-invariant
    (e.g. 'per-patient z-score')."""
    return EDMFactors(note=f"EDM not applicable: {normalization} is scale-invariant")


def factors(training_means: dict[str, float], external_means: dict[str, float],
            reference_institution: str) -> EDMFactors:
    """mu1 / mu2 per modality from the training institution's and the external data's means."""
    ratio = {}
    for modality in MODALITIES:
        mu1, mu2 = training_means[modality], external_means[modality]
        if mu2 <= 0:
            raise ValueError(f"external {modality} mean is {mu2}; EDM needs a positive mean")
        ratio[modality] = mu1 / mu2
    return EDMFactors(ratio["t1w"], ratio["t2w"], True, reference_institution)


def apply(volume: np.ndarray, factor: float) -> np.ndarray:
    """y = factor * x."""
    return (np.asarray(volume, np.float32) * np.float32(factor)).astype(np.float32)
