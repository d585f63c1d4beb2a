"""Fitness screening (seed 000: a classification network that screens out data the model is
not fit for, e.g. rare tumour sizes or morphologies, or data unlike the training set).

Three stages, each refusal with a specific reason:
1. checks for unusable input: too few slices, a body part that is not head and neck, T1w and
   T2w that do not cover the same anatomy (a registration beyond the plausible bound is not
   applied, see synthesis.alignment, rather than a reason to refuse), and the checks of
   ``synthesis.checks`` that need no model (contrast, copies, noise, artefacts, header and
   geometry);
2. the fitness classifier stored with the model (seed 000's classification network,
   synthesis/models/fitness.py): a study whose mean slice logit is below its calibrated
   threshold is refused;
3. an out-of-distribution score on the generator's own features: per study, the spatial mean
   and standard deviation of every channel of a named layer (decoder block 1 of MMgSN-Net),
   averaged over slices; the score is the RMS z-distance to the training studies' features
   (diagonal covariance with a floor: training sets are far smaller than the feature count),
   and the threshold is calibrated on the training studies (leave-one-out) and stored in the
   model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .checkpoint import OODCalibration

#: BodyPartExamined values that are head and neck (PS3.16 CID 4031 terms and common ones).
HEAD_NECK_PARTS = frozenset({"HEADNECK", "HEAD", "NECK", "HEAD NECK", "HN", "NASOPHARYNX",
                             "PHARYNX", "BRAIN", "SKULL", "FACE", "OROPHARYNX"})
#: The T2w must cover at least this fraction of the T1w's field of view (and, in training, the
#: CE-T1w too): less, and the series do not show the same anatomy in the same place.
MIN_OVERLAP = 0.8
#: Threshold = max(training quantile) times this margin (new scanners vary more than training).
THRESHOLD_MARGIN = 1.5


@dataclass(frozen=True)
class Screening:
    """Whether the study may be synthesized, why not, the OOD and fitness scores, and (when
    screening was recorded but not enforced, e.g. a forced job) that it was overridden."""

    accepted: bool
    reasons: list[str] = field(default_factory=list)
    ood_score: float | None = None
    ood_threshold: float | None = None
    fitness_score: float | None = None
    fitness_threshold: float | None = None
    evidence: dict[str, object] = field(default_factory=dict)

    @property
    def combined(self) -> float | None:
        """One score for both model-based stages: the larger of the OOD score over its
        threshold and exp(fitness threshold - fitness score); above 1 is refused by one of
        them (what benchmarks/screening.py ranks for its AUROC)."""
        parts = []
        if self.ood_score is not None and self.ood_threshold:
            parts.append(self.ood_score / self.ood_threshold)
        if self.fitness_score is not None and self.fitness_threshold is not None:
            parts.append(float(np.exp(self.fitness_threshold - self.fitness_score)))
        return max(parts) if parts else None

    def as_dict(self) -> dict[str, object]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {"accepted": self.accepted, "reasons": list(self.reasons),
                "ood_score": rounded(self.ood_score), "ood_threshold": rounded(self.ood_threshold),
                "fitness_score": rounded(self.fitness_score),
                "fitness_threshold": rounded(self.fitness_threshold),
                "combined_score": rounded(self.combined), "evidence": dict(self.evidence)}


def input_checks(slices: int, body_part: str, overlap: float, *,
                 min_slices: int = 5, min_overlap: float = MIN_OVERLAP) -> list[str]:
    """Reasons the input is unusable (empty when it is fine)."""
    reasons = []
    if slices < min_slices:
        reasons.append(f"too few slices: {slices} (at least {min_slices} needed)")
    part = " ".join(body_part.upper().replace("_", " ").split())
    if part and part not in HEAD_NECK_PARTS and part.replace(" ", "") not in HEAD_NECK_PARTS:
        reasons.append(f"body part {body_part!r} is not head and neck")
    if overlap < min_overlap:
        reasons.append(f"T1w and T2w cover different anatomy: only {overlap:.0%} of the T1w "
                       f"field of view is inside the T2w (at least {min_overlap:.0%} needed)")
    return reasons


class FeatureProbe:
    """Collects the pooled features of one layer of a generator during forward passes."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        modules = dict(model.named_modules())
        if layer not in modules:
            raise KeyError(f"the model has no layer {layer!r} to screen with")
        self.rows: list[torch.Tensor] = []
        self._handle = modules[layer].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        flat = output.detach().float().flatten(2)
        self.rows.append(torch.cat([flat.mean(2), flat.std(2)], 1).cpu())

    def study_vector(self) -> np.ndarray:
        """The study's feature vector: per-slice pooled features averaged over slices."""
        return torch.cat(self.rows).mean(0).numpy()

    def close(self) -> None:
        self._handle.remove()


def _score(vector: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> float:
    return float(np.sqrt(np.mean(((vector - mean) / scale) ** 2)))


def _spread(vectors: np.ndarray) -> np.ndarray:
    # Each feature's spread, floored at a tenth of the typical feature magnitude: with the few
    # studies a hospital trains on, some features barely vary and would make any new study
    # look far away.
    return vectors.std(0) + 0.1 * (np.abs(vectors).mean() + 1e-6)


def calibrate(study_vectors: Iterable[np.ndarray], layer: str,
              quantile: float = 0.99) -> OODCalibration:
    """Calibration from the training studies' feature vectors (see the module docstring).

    The threshold comes from leave-one-out scores (each study against the others), which
    estimate how far an unseen study from the training distribution lands, times
    :data:`THRESHOLD_MARGIN`."""
    vectors = np.stack(list(study_vectors))
    mean, scale = vectors.mean(0), _spread(vectors)
    if len(vectors) >= 3:
        scores = []
        for i in range(len(vectors)):
            others = np.delete(vectors, i, axis=0)
            scores.append(_score(vectors[i], others.mean(0), _spread(others)))
    else:
        scores = [_score(v, mean, scale) for v in vectors]
    threshold = float(np.quantile(scores, quantile)) * THRESHOLD_MARGIN
    return OODCalibration(feature=layer, mean=mean.tolist(), precision=[scale.tolist()],
                          threshold=threshold, quantile=quantile)


def ood_score(vector: np.ndarray, calibration: OODCalibration) -> float:
    """The study's distance from the training distribution (RMS z)."""
    return _score(vector, np.asarray(calibration.mean), np.asarray(calibration.precision[0]))


def judge(reasons: list[str], score: float | None,
          calibration: OODCalibration | None, fitness: float | None = None,
          fitness_threshold: float | None = None,
          evidence: dict[str, object] | None = None) -> Screening:
    """The screening outcome from the input checks, the fitness score and the OOD score."""
    reasons = list(reasons)
    if fitness is not None and fitness_threshold is not None and fitness < fitness_threshold:
        reasons.append(f"the fitness classifier finds the study unfit for this model (score "
                       f"{fitness:.2f}, below its calibrated threshold {fitness_threshold:.2f})")
    threshold = calibration.threshold if calibration is not None else None
    if score is not None and threshold is not None and score > threshold:
        reasons.append(f"unlike the training data: out-of-distribution score {score:.2f} "
                       f"above the calibrated threshold {threshold:.2f}")
    return Screening(not reasons, reasons, score, threshold, fitness, fitness_threshold,
                     dict(evidence or {}))
