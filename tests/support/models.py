"""Small checkpoints for tests: an (untrained) small MMgSN-Net with institution profiles and
an OOD calibration measured on a simulated cohort, the way training stores them.

The weights are random: tests that use this check mechanics (geometry, units, screening,
refusals), never synthesis quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from simulation import SITES
from synthesis.alignment import resample_onto
from synthesis.checkpoint import (
    Architecture,
    CheckpointMeta,
    InstitutionProfile,
    NormalizationMeta,
    SequenceRange,
    save_checkpoint,
)
from synthesis.models import build
from synthesis.pipeline import PipelineOptions, Synthesizer
from synthesis.preprocess import clean_pair
from synthesis.screening import FeatureProbe, calibrate
from synthesis.series import read_series

LAYER = "decode1"
OOD_WIDENING = 2.0


def _profile(key: str, means: dict[str, list[float]]) -> InstitutionProfile:
    site = SITES[key]
    return InstitutionProfile(
        key=key, manufacturer=site.manufacturer, model=site.model, field_strength_t=site.field_t,
        institution_names=[site.institution_name], station_names=[site.station_name],
        sequences={role: SequenceRange(repetition_time_ms=site.sequence(role).tr_ms,
                                       echo_time_ms=site.sequence(role).te_ms)
                   for role in ("t1w", "t2w")},
        patient_mean={m: float(np.mean(v)) for m, v in means.items()},
        patient_mean_std={m: float(np.std(v)) + 1e-3 for m, v in means.items()},
        patients=len(means["t1w"]),
    )


def make_checkpoint(path: Path, cohort: Path, training_sites: tuple[str, ...],
                    width: float = 0.125) -> Path:
    """Save a checkpoint "trained" on ``training_sites`` of a simulated ``cohort``.

    The OOD calibration uses the features of the inference pipeline itself (the
    ``Synthesizer`` on each training study, unscreened), so a training study sent to the node
    scores as it did at calibration. Fewer than three studies give no leave-one-out estimate
    of how far an unseen study lands (``calibrate``), so there the threshold is widened to
    :data:`OOD_WIDENING` times theirs: a training study sent again lossily compressed (JPEG 2000
    5:1 scores 1.6 times its original) or cut to its first slices still passes, and a study
    that is not head-and-neck MR does not."""
    torch.manual_seed(0)
    generator = build("mmgsn", width_multiplier=width, output="linear").eval()
    profiles, studies = [], []
    for key in training_sites:
        means: dict[str, list[float]] = {"t1w": [], "t2w": []}
        for folder in sorted((cohort / key).iterdir()):
            t1, t2 = read_series(folder / "t1w"), read_series(folder / "t2w")
            clean, masks = clean_pair(np.asarray(t1.array, np.float32),
                                      np.asarray(resample_onto(t2, t1).array, np.float32))
            for m in ("t1w", "t2w"):
                means[m].append(float(clean[m][masks[m]].mean()))
            studies.append((t1, t2))
        profiles.append(_profile(key, means))
    meta = CheckpointMeta(
        architecture=Architecture(name="mmgsn", config=generator.config),
        normalization=NormalizationMeta(method="zscore", level="patient"),
        institutions=profiles,
        description="test checkpoint: random weights",
    )
    save_checkpoint(path, generator, meta)
    synthesizer = Synthesizer(path, PipelineOptions(device="cpu", confidence=False))
    vectors = []
    for t1, t2 in studies:
        probe = FeatureProbe(synthesizer.predictor.model, LAYER)
        try:
            synthesizer.run(t1, t2, screen=False)
            vectors.append(probe.study_vector())
        finally:
            probe.close()
    meta.ood = calibrate(vectors, LAYER)
    if len(vectors) < 3:
        meta.ood.threshold = OOD_WIDENING * float(meta.ood.threshold or 0.0)
    return save_checkpoint(path, generator, meta)
