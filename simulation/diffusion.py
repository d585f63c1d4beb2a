"""Diffusion-weighted imaging (DWI), opt-in (``vcemri simulate --dwi``): a single-shot
spin-echo echo-planar series at b = 0 and 1000 s/mm^2 and the ADC map the scanner computes
from it.

The physics: a fat-suppressed spin echo, S(b) = S_SE(TR, TE, T1, T2, PD) exp(-b ADC), with each
tissue's ADC from :data:`simulation.tissues.ADC_MM2_S` (heterogeneous within a tissue by the
same texture field that varies its PD and T1), the spin echo's flow voids, and:

- lower resolution than the T1w: the same field of view, half the T1w matrix (rounded to
  even), 4-5 mm slices (no thinner than the T1w's) with a 10 % gap, covering what the T1w
  covers;
- EPI geometric distortion: off-resonance displaces every voxel along the phase-encoding
  direction (anterior-posterior, the geometry's column direction), by a smooth random
  quadratic field of up to :func:`draw_protocol`'s ``shift_max_mm`` (a few mm, twice as much
  at 3 T as at 1.5 T); the anatomy is evaluated at the displaced points and the signal
  piles up or thins out with the field's gradient (the Jacobian);
- the patient's coil bias (the same as in their other series), the scanner's intensity scale
  and the session's gain, and Rician noise of 4-6 % of the b = 0 head mean, the same sigma at
  b = 1000 (DWI is noisy).

Everything random is drawn from the generator the caller gives (the cohort uses a stream of
its own, so that a cohort without DWI draws exactly what it drew before).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .acquisition import SUBPLANES, Artefacts, Geometry, Scene, make_geometry, relaxation
from .mr_physics import bias_field, rician, sequence_factor, signal
from .phantom import Patient, anatomy
from .sites import Grid, PulseSequence, Site
from .tissues import Tissue, adc_map

#: The two b-values (s/mm^2) of the series.
B_VALUES = (0, 1000)
#: Protocol ranges drawn per patient (typical clinical head-and-neck SS-EPI DWI).
TR_MS = (4000.0, 6000.0)
TE_MS = (60.0, 90.0)
THICKNESS_MM = (4.0, 4.5, 5.0)
GAP_FRACTION = 0.1
#: Rician sigma as a fraction of the b = 0 mean over the head.
NOISE = (0.04, 0.06)
#: Largest EPI displacement over the head (mm) at 1.5 T; it doubles at 3 T (off-resonance in Hz
#: scales with the field), capped at :data:`SHIFT_CAP_MM`.
SHIFT_MM_15T = (1.5, 2.0)
SHIFT_CAP_MM = 4.0
#: The ADC map: computed where S(b=0) exceeds this many noise sigmas (0 elsewhere), clipped to
#: :data:`ADC_MAX_MM2_S` and stored in units of :data:`ADC_UNIT_MM2_S` (as Siemens stores it).
ADC_THRESHOLD_SIGMAS = 4.0
ADC_MAX_MM2_S = 4.0e-3
ADC_UNIT_MM2_S = 1.0e-6

#: A head-sized box (patient mm) over which the distortion's largest shift is normalised.
_BOX = np.stack(np.meshgrid(np.linspace(-75, 75, 11), np.linspace(-95, 95, 11),
                            np.linspace(-55, 70, 11), indexing="ij"), axis=-1).reshape(-1, 3)

#: Series descriptions and sequence names by manufacturer (the ADC series adds " ADC").
_NAMING = {
    "SIEMENS": ("ep2d_diff_tra b0 b1000", "*ep_b"),
    "PHILIPS": ("DWI_SSh b0 b1000", "DwiSE"),
    "GE": ("AX DWI B0 B1000", "epi2"),
    "CANON": ("DWI b0 b1000 AX", "SE_EPI"),
    "UIH": ("dwi_tra b0 b1000", "epi_dwi"),
}


def sequence(site: Site) -> PulseSequence:
    """The site's DWI sequence: a fat-suppressed spin echo (EPI readout), named as its
    manufacturer names it."""
    description, name = next(
        (naming for vendor, naming in _NAMING.items()
         if site.manufacturer.upper().startswith(vendor)),
        ("DWI b0 b1000 tra", "ep_dwi"))
    return PulseSequence("SE", description, TR_MS, TE_MS, sequence_name=name,
                         fat_suppressed=True)


@dataclass(frozen=True)
class DiffusionProtocol:
    """One patient's DWI: TR, TE (ms), slice thickness (mm), the largest EPI shift over the head
    (mm) and the noise fraction."""

    tr_ms: float
    te_ms: float
    slice_thickness_mm: float
    shift_max_mm: float
    noise: float

    @property
    def slice_gap_mm(self) -> float:
        return round(GAP_FRACTION * self.slice_thickness_mm, 3)


def draw_protocol(site: Site, rng: np.random.Generator) -> DiffusionProtocol:
    """TR, TE, slice thickness (never thinner than the site's T1w slices), distortion amplitude
    (by the site's field strength) and noise, drawn inside the ranges above."""
    tr = float(rng.uniform(*TR_MS))
    te = float(rng.uniform(*TE_MS))
    thickness = max(float(rng.choice(THICKNESS_MM)), site.grid.slice_thickness_mm)
    shift = min(SHIFT_CAP_MM, float(rng.uniform(*SHIFT_MM_15T)) * site.field_t / 1.5)
    noise = float(rng.uniform(*NOISE))
    return DiffusionProtocol(tr, te, thickness, shift, noise)


def grid(t1w: Grid, protocol: DiffusionProtocol) -> Grid:
    """The DWI grid: the T1w's field of view with half its matrix (rounded to even)."""
    rows = max(2, 2 * round(t1w.rows / 4))
    columns = max(2, 2 * round(t1w.columns / 4))
    return Grid(rows, columns, t1w.row_spacing_mm * t1w.rows / rows,
                t1w.column_spacing_mm * t1w.columns / columns, protocol.slice_thickness_mm,
                protocol.slice_gap_mm)


def geometry(site: Site, t1w_slices: int, protocol: DiffusionProtocol,
             matrix_scale: float = 1.0) -> Geometry:
    """The DWI's slices: they cover what the T1w's ``t1w_slices`` cover (one planned slab)."""
    dwi = grid(site.grid, protocol)
    count = max(2, round(t1w_slices * site.grid.slice_spacing_mm / dwi.slice_spacing_mm))
    return make_geometry(dwi, count, site.tilt_deg, matrix_scale)


@dataclass(frozen=True)
class Distortion:
    """EPI displacement along the phase-encoding ``direction`` (unit vector): a quadratic
    polynomial of the patient coordinates (per 100 mm), ``scale_mm`` times its
    ``coefficients``."""

    coefficients: np.ndarray  # (10,): 1, x, y, z, x^2, y^2, z^2, xy, yz, xz
    scale_mm: float
    direction: np.ndarray

    def __call__(self, points_mm: np.ndarray) -> np.ndarray:
        """Displacement (mm, signed along ``direction``) at ``points_mm`` (N x 3)."""
        u = np.asarray(points_mm, np.float64) / 100.0
        x, y, z = u[..., 0], u[..., 1], u[..., 2]
        terms = (np.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, y * z, x * z)
        field = sum(c * t for c, t in zip(self.coefficients, terms, strict=True))
        return (self.scale_mm * field).astype(np.float32)

    def jacobian(self, points_mm: np.ndarray) -> np.ndarray:
        """Signal density factor 1 - d(shift)/d(phase-encoding position), clipped to 0.5-1.5:
        where the field stretches the image the signal thins out, where it compresses it the
        signal piles up."""
        step = 0.5 * self.direction.astype(np.float32)
        slope = self(points_mm + step) - self(points_mm - step)
        return np.clip(1.0 - slope, 0.5, 1.5).astype(np.float32)


def distortion(max_mm: float, direction: np.ndarray, rng: np.random.Generator) -> Distortion:
    """A random smooth distortion whose largest shift over a head-sized box is ``max_mm``."""
    coefficients = rng.normal(0.0, 1.0, 10)
    unit = Distortion(coefficients, 1.0, np.asarray(direction, float))
    peak = float(np.abs(unit(_BOX)).max())
    return replace(unit, scale_mm=max_mm / max(peak, 1e-6))


@dataclass(frozen=True)
class Diffusion:
    """One patient's DWI on its (undistorted, as written) geometry: b = 0 and b = 1000 in
    scanner units with noise, the ADC map computed from them (mm^2/s), the anatomy each voxel
    shows (distorted), the displacement (mm) and the noise sigma."""

    protocol: DiffusionProtocol
    geometry: Geometry
    scene: Scene
    shift_mm: np.ndarray  # (slices, rows, columns), along the column direction
    b0: np.ndarray
    b1000: np.ndarray
    adc: np.ndarray
    sigma: float

    def describe(self) -> dict[str, float]:
        """The protocol as cohort.json records it."""
        head = self.scene.labels != Tissue.AIR
        shift = float(np.abs(self.shift_mm[head]).max()) if head.any() else 0.0
        g, p = self.geometry, self.protocol
        return {"tr_ms": round(p.tr_ms, 3), "te_ms": round(p.te_ms, 3),
                "b_low": float(B_VALUES[0]), "b_high": float(B_VALUES[1]),
                "slice_thickness_mm": p.slice_thickness_mm, "slice_gap_mm": p.slice_gap_mm,
                "rows": float(g.rows), "columns": float(g.columns),
                "epi_shift_max_mm": round(shift, 3), "noise": round(p.noise, 4)}


def distorted_scene(patient: Patient, geometry: Geometry,
                    field: Distortion) -> tuple[Scene, tuple[np.ndarray, ...]]:
    """The anatomy each DWI voxel shows (at its position minus the EPI shift), per sub-plane,
    and the Jacobian factor of each sub-plane."""
    e = geometry.column_direction.astype(np.float32)
    planes, jacobians = [], []
    for f in SUBPLANES:
        seen = geometry.points(f)
        planes.append(anatomy(patient, seen - field(seen)[:, None] * e))
        jacobians.append(field.jacobian(seen))
    return Scene(geometry, tuple(planes)), tuple(jacobians)


def _signals(scene: Scene, jacobians: tuple[np.ndarray, ...], seq: PulseSequence,
             protocol: DiffusionProtocol, field_t: float) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free S(b=0) and S(b=1000) in PD units, averaged over the sub-planes."""
    low = np.zeros(scene.planes[0].labels.shape, np.float32)
    high = np.zeros_like(low)
    for plane, jacobian in zip(scene.planes, jacobians, strict=True):
        maps, pd, t1 = relaxation(plane, field_t)
        adc = adc_map(plane.labels) * (1.0 + 0.5 * maps["texture"] * plane.texture)
        base = signal(seq, protocol.tr_ms, protocol.te_ms, t1, maps["t2_ms"], pd)
        base = base * sequence_factor(seq, plane.labels) * jacobian
        low += base * np.exp(-B_VALUES[0] * adc)
        high += base * np.exp(-B_VALUES[1] * adc)
    n = len(scene.planes)
    return (low / n).reshape(scene.shape), (high / n).reshape(scene.shape)


def adc_from_images(b0: np.ndarray, b1000: np.ndarray, threshold: float) -> np.ndarray:
    """ADC = ln(S0 / S1000) / (b1000 - b0) in mm^2/s where S0 > ``threshold``, 0 elsewhere,
    clipped to 0..:data:`ADC_MAX_MM2_S`."""
    valid = b0 > threshold
    ratio = np.maximum(b0, 1e-6) / np.maximum(b1000, 1e-6)
    adc = np.log(np.maximum(ratio, 1.0)) / float(B_VALUES[1] - B_VALUES[0])
    return np.where(valid, np.clip(adc, 0.0, ADC_MAX_MM2_S), 0.0).astype(np.float32)


def acquire(patient: Patient, site: Site, geometry: Geometry, protocol: DiffusionProtocol,
            gain: float, rng: np.random.Generator,
            artefacts: Artefacts | None = None) -> Diffusion:
    """Simulate the patient's DWI at ``site`` (field strength, coil bias amplitude, intensity
    scale) on ``geometry``: the distortion and the noise are drawn from ``rng``."""
    field = distortion(protocol.shift_max_mm, geometry.column_direction, rng)
    seen, jacobians = distorted_scene(patient, geometry, field)
    seq = sequence(site)
    low, high = _signals(seen, jacobians, seq, protocol, site.field_t)
    points = geometry.points()
    shift = field(points)
    # The coil sees the spins where they are, not where EPI puts them.
    true = points - shift[:, None] * geometry.column_direction.astype(np.float32)
    bias = bias_field(true, site.bias, np.random.default_rng(patient.bias_seed))
    scale = bias.reshape(seen.shape) * (site.intensity_scale * gain)
    low, high = low * scale, high * scale
    if artefacts is not None:
        # EPI reads out a gradient echo train: metal voids it as widely as a gradient echo.
        voids = artefacts.susceptibility(seen, patient, replace(seq, kind="GRE"))
        low, high = artefacts.ghosts(low * voids), artefacts.ghosts(high * voids)
    head = seen.labels != Tissue.AIR
    sigma = protocol.noise * float(low[head].mean() if head.any() else 1.0)
    b0 = rician(low, sigma, rng)
    b1000 = rician(high, sigma, rng)
    adc = adc_from_images(b0, b1000, ADC_THRESHOLD_SIGMAS * sigma)
    return Diffusion(protocol, geometry, seen, shift.reshape(seen.shape), b0, b1000, adc,
                     sigma)
