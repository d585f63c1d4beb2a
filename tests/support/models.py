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
from synthesis.normalization import Normalization
from synthesis.preprocess import clean_pair, to_model_grid
from synthesis.screening import FeatureProbe, calibrate
from synthesis.series import read_series

LAYER = "decode1"


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
    """Save a checkpoint "trained" on ``training_sites`` of a simulated ``cohort``."""
    torch.manual_seed(0)
    generator = build("mmgsn", width_multiplier=width, output="linear").eval()
    norm = Normalization("zscore", "patient")
    profiles, vectors = [], []
    for key in training_sites:
        means: dict[str, list[float]] = {"t1w": [], "t2w": []}
        for folder in sorted((cohort / key).iterdir()):
            t1 = read_series(folder / "t1w")
            t2 = resample_onto(read_series(folder / "t2w"), t1)
            clean, masks = clean_pair(np.asarray(t1.array, np.float32),
                                      np.asarray(t2.array, np.float32))
            arrays = {}
            for m in ("t1w", "t2w"):
                means[m].append(float(clean[m][masks[m]].mean()))
                arrays[m] = norm.normalize_volume(clean[m], norm.statistics(clean[m], masks[m]))
            probe = FeatureProbe(generator, LAYER)
            with torch.inference_mode():
                generator(to_model_grid(np.stack([arrays["t1w"], arrays["t2w"]], 1)))
            vectors.append(probe.study_vector())
            probe.close()
        profiles.append(_profile(key, means))
    meta = CheckpointMeta(
        architecture=Architecture(name="mmgsn", config=generator.config),
        normalization=NormalizationMeta(method="zscore", level="patient"),
        institutions=profiles,
        ood=calibrate(vectors, LAYER),
        description="test checkpoint: random weights",
    )
    return save_checkpoint(path, generator, meta)
