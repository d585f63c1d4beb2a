"""MR signal equations, gadolinium relaxation, flow, bias field and Rician noise.

Signals are in proton-density units (a fully relaxed water voxel gives 1); institutions scale
them into their scanner units. Times are in ms, angles in degrees, concentrations in mmol/L.
"""

from __future__ import annotations

import numpy as np

from .sites import PulseSequence
from .tissues import Tissue, relaxivity

#: Signal multipliers for flowing blood: spin-echo sequences show a flow void (spins leave
#: the slice between the 90 and 180 degree pulses); gradient echoes show inflow enhancement.
_FLOW = {
    "SE": {Tissue.ARTERY: 0.08, Tissue.VEIN: 0.35},
    "FSE": {Tissue.ARTERY: 0.08, Tissue.VEIN: 0.35},
    "STIR": {Tissue.ARTERY: 0.05, Tissue.VEIN: 0.3},
    "IR": {Tissue.ARTERY: 0.08, Tissue.VEIN: 0.35},
    "GRE": {Tissue.ARTERY: 1.3, Tissue.VEIN: 1.0},
}

#: Signal left to fat under chemical fat suppression (fat saturation, SPAIR): a few per cent
#: in subcutaneous fat; marrow, about half water, keeps more.
FAT_SUPPRESSION = {Tissue.FAT: 0.08, Tissue.MARROW: 0.4}

#: T2* is shorter than T2 (field inhomogeneity); a fixed ratio is enough at our short TEs.
_T2STAR_RATIO = 0.7


def with_gadolinium(
    t1_ms: np.ndarray, t2_ms: np.ndarray, gd_mmol: np.ndarray, field_t: float
) -> tuple[np.ndarray, np.ndarray]:
    """Relaxation times shortened by contrast agent: 1/T1' = 1/T1 + r1*C (and T2 with r2)."""
    r1, r2 = relaxivity(field_t)
    t1 = 1.0 / (1.0 / t1_ms + r1 * gd_mmol / 1000.0)
    t2 = 1.0 / (1.0 / t2_ms + r2 * gd_mmol / 1000.0)
    return t1.astype(np.float32), t2.astype(np.float32)


def signal(
    sequence: PulseSequence,
    tr_ms: float,
    te_ms: float,
    t1_ms: np.ndarray,
    t2_ms: np.ndarray,
    pd: np.ndarray,
) -> np.ndarray:
    """Steady-state magnitude signal of ``sequence`` for each voxel's T1, T2 and PD.

    - SE / FSE: PD (1 - exp(-TR/T1)) exp(-TE/T2), TE the effective echo time for FSE;
    - STIR and IR (T1-FLAIR): PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2), a magnitude
      reconstruction;
    - spoiled GRE: PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE/T2*), E1 = exp(-TR/T1).
    """
    e1 = np.exp(-tr_ms / t1_ms)
    if sequence.kind in ("SE", "FSE"):
        out = pd * (1.0 - e1) * np.exp(-te_ms / t2_ms)
    elif sequence.kind in ("STIR", "IR"):
        ti = float(sequence.ti_ms or 0.0)
        out = pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1_ms) + e1) * np.exp(-te_ms / t2_ms)
    else:
        alpha = np.deg2rad(sequence.flip_deg)
        steady = np.sin(alpha) * (1.0 - e1) / (1.0 - np.cos(alpha) * e1)
        # Normalize so a GRE's brightest tissues land near an SE's (scanner scaling does
        # the same); 1/sin(alpha) keeps the numbers O(1) for small flip angles.
        out = pd * steady / np.sin(alpha) * np.exp(-te_ms / (_T2STAR_RATIO * t2_ms))
    return out.astype(np.float32)


def sequence_factor(sequence: PulseSequence, labels: np.ndarray) -> np.ndarray:
    """Per-voxel multiplier for flowing blood in this sequence, and for fat when the sequence
    suppresses it (1 elsewhere)."""
    factor = np.ones(labels.shape, np.float32)
    for tissue, value in _FLOW[sequence.kind].items():
        factor[labels == tissue] = value
    if sequence.fat_suppressed:
        for tissue, value in FAT_SUPPRESSION.items():
            factor[labels == tissue] = value
    return factor


def rician(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise of standard deviation ``sigma``."""
    real = clean + rng.normal(0.0, sigma, clean.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, clean.shape).astype(np.float32)
    return np.hypot(real, imag)


def bias_field(points_mm: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative receive-coil bias over ``points_mm`` (N x 3, patient mm).

    A random quadratic polynomial in coordinates normalized by 120 mm, scaled so that its
    range over a head-sized region is about ``amplitude`` (peak to peak), centred on 1.
    """
    u = points_mm / 120.0
    coefficients = rng.normal(0.0, 1.0, 9)
    x, y, z = u[..., 0], u[..., 1], u[..., 2]
    terms = (x, y, z, x * x, y * y, z * z, x * y, y * z, x * z)
    field = sum(c * t for c, t in zip(coefficients, terms, strict=True))
    scale = amplitude / (np.abs(coefficients).sum() * 1.2 + 1e-6)
    return (1.0 + scale * field).astype(np.float32)
