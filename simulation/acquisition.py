"""Acquiring a simulated patient: slice geometry, anatomy at the voxel centres with
through-slice partial volume, contrast agent, signal equations, bias, noise and scanner units.

Volumes are (slices, rows, columns) with slices in ascending order along the slice normal;
the DICOM writer decides the instance order an institution uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .mr_physics import bias_field, rician, sequence_factor, signal, with_gadolinium
from .phantom import Anatomy, Patient, anatomy
from .sites import Grid, PulseSequence, Role, Site
from .tissues import Tissue, property_maps

#: Sub-planes averaged through each slice (partial volume of 3-5 mm slices).
SUBPLANES = (-0.25, 0.25)

#: Centre of the imaged volume along the slice normal (mm): just above the nasopharynx, so
#: that ~120 mm cover the oropharynx up to the temporal lobes.
COVERAGE_CENTRE_MM = 8.0
DEFAULT_COVERAGE_MM = 120.0


@dataclass(frozen=True)
class Geometry:
    """Where a series' voxels are: DICOM image plane attributes for every slice (mm)."""

    rows: int
    columns: int
    row_spacing_mm: float  # between rows (DICOM PixelSpacing[0])
    column_spacing_mm: float  # between columns (PixelSpacing[1])
    slice_thickness_mm: float
    slice_spacing_mm: float
    row_direction: np.ndarray  # unit vector along a row (increasing column index)
    column_direction: np.ndarray  # unit vector along a column (increasing row index)
    positions: np.ndarray  # (slices, 3) ImagePositionPatient, ascending along the normal

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    @property
    def slices(self) -> int:
        return len(self.positions)

    @property
    def orientation(self) -> list[float]:
        """ImageOrientationPatient."""
        return [float(v) for v in (*self.row_direction, *self.column_direction)]

    def points(self, offset_fraction: float = 0.0) -> np.ndarray:
        """Voxel centres (slices*rows*columns, 3) in patient mm, optionally shifted along the
        normal by a fraction of the slice thickness."""
        r = np.arange(self.rows, dtype=np.float32) * self.row_spacing_mm
        c = np.arange(self.columns, dtype=np.float32) * self.column_spacing_mm
        plane = (r[:, None, None] * self.column_direction.astype(np.float32)
                 + c[None, :, None] * self.row_direction.astype(np.float32))  # (R, C, 3)
        shift = self.normal.astype(np.float32) * offset_fraction * self.slice_thickness_mm
        origins = self.positions.astype(np.float32) + shift
        return (origins[:, None, None, :] + plane[None]).reshape(-1, 3)


def make_geometry(grid: Grid, slices: int, tilt_deg: float = 0.0,
                  matrix_scale: float = 1.0) -> Geometry:
    """An axial (optionally oblique about left-right) geometry centred on the nasopharynx.

    ``matrix_scale`` shrinks the matrix and enlarges the pixels by the same factor, keeping
    the field of view (for small, fast test cohorts).
    """
    rows = max(8, int(round(grid.rows * matrix_scale)))
    columns = max(8, int(round(grid.columns * matrix_scale)))
    row_spacing = grid.row_spacing_mm * grid.rows / rows
    column_spacing = grid.column_spacing_mm * grid.columns / columns
    t = np.deg2rad(tilt_deg)
    row_direction = np.array([1.0, 0.0, 0.0])
    column_direction = np.array([0.0, np.cos(t), -np.sin(t)])
    normal = np.cross(row_direction, column_direction)
    centre = np.array([0.0, 0.0, COVERAGE_CENTRE_MM])
    spacing = grid.slice_spacing_mm
    offsets = (np.arange(slices) - (slices - 1) / 2.0) * spacing
    corner = (centre - row_direction * column_spacing * (columns - 1) / 2.0
              - column_direction * row_spacing * (rows - 1) / 2.0)
    positions = corner[None, :] + offsets[:, None] * normal[None, :]
    return Geometry(rows, columns, row_spacing, column_spacing, grid.slice_thickness_mm,
                    spacing, row_direction, column_direction, np.round(positions, 4))


def default_slices(grid: Grid) -> int:
    """Slices that cover :data:`DEFAULT_COVERAGE_MM` at this grid's slice spacing."""
    return max(4, int(round(DEFAULT_COVERAGE_MM / grid.slice_spacing_mm)))


@dataclass(frozen=True)
class Protocol:
    """The TR/TE (ms) actually used for one patient's series."""

    tr_ms: float
    te_ms: float


def draw_protocols(site: Site, rng: np.random.Generator) -> dict[Role, Protocol]:
    """TR and TE for each series, drawn inside the site's ranges; the CE series reuses
    the T1w's when both use the same sequence (one protocol, before and after contrast)."""
    out: dict[Role, Protocol] = {}
    for role in ("t1w", "t2w", "ce"):
        seq = site.sequence(role)  # type: ignore[arg-type]
        out[role] = Protocol(float(rng.uniform(*seq.tr_ms)), float(rng.uniform(*seq.te_ms)))  # type: ignore[index]
    t1, ce = site.t1w, site.ce
    if (t1.kind, t1.tr_ms, t1.te_ms, t1.flip_deg) == (ce.kind, ce.tr_ms, ce.te_ms, ce.flip_deg):
        out["ce"] = out["t1w"]
    return out


@dataclass(frozen=True)
class Artefacts:
    """Artefacts beyond noise and bias that randomised protocols add (none by default):

    - a dental susceptibility artefact: a signal void of ``dental_radius_mm`` around a point of
      the patient's canonical anatomy (a filling or a crown, mm), with a bright rim where the
      field distortion piles signal up; gradient echoes, which do not refocus the dephasing,
      show it 1.6 times wider;
    - motion ghosts: two copies of the image shifted by +-``ghost_shift`` of the matrix along
      the phase-encoding (anterior-posterior, row) direction, each half of ``ghost_fraction``
      of the signal (swallowing or breathing during the acquisition), in every series of
      the patient.
    """

    dental_centre_mm: tuple[float, float, float] | None = None
    dental_radius_mm: float = 0.0
    ghost_fraction: float = 0.0
    ghost_shift: float = 0.33

    def susceptibility(self, scene: Scene, patient: Patient,
                       sequence: PulseSequence) -> np.ndarray | float:
        """Multiplier of the signal (slices x rows x columns), or 1.0 without a filling."""
        if self.dental_centre_mm is None or self.dental_radius_mm <= 0:
            return 1.0
        radius = self.dental_radius_mm * (1.6 if sequence.kind == "GRE" else 1.0)
        canonical = patient.to_canonical(scene.geometry.points())
        d = np.linalg.norm(canonical - np.asarray(self.dental_centre_mm, np.float32), axis=1)
        void = 1.0 - 0.95 * np.exp(-((d / radius) ** 6))
        rim = 0.6 * np.exp(-(((d - 1.15 * radius) / (0.15 * radius)) ** 2))
        return (void + rim).astype(np.float32).reshape(scene.shape)

    def ghosts(self, image: np.ndarray) -> np.ndarray:
        """``image`` plus its motion ghosts along the rows (axis 1)."""
        if self.ghost_fraction <= 0:
            return image
        shift = max(1, int(round(image.shape[1] * self.ghost_shift)))
        copies = np.roll(image, shift, axis=1) + np.roll(image, -shift, axis=1)
        return (image + 0.5 * self.ghost_fraction * copies).astype(np.float32)


@dataclass(frozen=True)
class Scene:
    """A patient's anatomy on one geometry, at each through-slice sub-plane; the series that
    share a geometry (T1w and CE, often T2w) share a scene."""

    geometry: Geometry
    planes: tuple[Anatomy, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.geometry.slices, self.geometry.rows, self.geometry.columns)

    @property
    def labels(self) -> np.ndarray:
        """Tissue labels of the first sub-plane, (slices, rows, columns)."""
        return self.planes[0].labels.reshape(self.shape)

    @property
    def tumour(self) -> np.ndarray:
        """Voxels at least half covered by tumour, (slices, rows, columns)."""
        votes = sum(plane.tumour.astype(np.float32) for plane in self.planes)
        return (votes / len(self.planes) >= 0.5).reshape(self.shape)


def scene(patient: Patient, geometry: Geometry) -> Scene:
    """Evaluate the patient's anatomy on the geometry's voxel centres."""
    return Scene(geometry, tuple(anatomy(patient, geometry.points(f)) for f in SUBPLANES))


def relaxation(plane: Anatomy, field_t: float) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                         np.ndarray]:
    """One sub-plane's tissue property maps (``tissues.property_maps``) and its PD and T1
    varied by each tissue's texture (T1 by half as much): what every series' signal starts
    from."""
    maps = property_maps(plane.labels, field_t)
    pd = maps["pd"] * (1.0 + maps["texture"] * plane.texture)
    t1 = maps["t1_ms"] * (1.0 + 0.5 * maps["texture"] * plane.texture)
    return maps, pd, t1


def _signal(scene: Scene, sequence: PulseSequence, protocol: Protocol, field_t: float,
            contrast: bool) -> np.ndarray:
    """Noise-free signal (PD units) averaged over the sub-planes."""
    total = np.zeros(scene.planes[0].labels.shape, np.float32)
    for plane in scene.planes:
        maps, pd, t1 = relaxation(plane, field_t)
        t2 = maps["t2_ms"]
        if contrast:
            # Heterogeneous uptake inside the tumour, independent of its T1/T2 texture.
            gd = maps["gd_mmol"] * np.where(plane.tumour, np.clip(1.0 + 0.6 * plane.uptake,
                                                                  0.25, 1.8), 1.0)
            t1, t2 = with_gadolinium(t1, t2, gd.astype(np.float32), field_t)
        total += signal(sequence, protocol.tr_ms, protocol.te_ms, t1, t2, pd) * sequence_factor(
            sequence, plane.labels)
    return (total / len(scene.planes)).reshape(scene.shape)


def acquire(scene: Scene, patient: Patient, site: Site, role: Role,
            protocol: Protocol, gain: float, rng: np.random.Generator,
            protocol_t1w: Protocol | None = None,
            artefacts: Artefacts | None = None) -> np.ndarray:
    """Simulate one series in scanner units (float32, slices x rows x columns): physics, the
    patient's coil bias (the same for all their series), the scanner's scale times the
    patient's ``gain``, ``artefacts`` if any, and Rician noise drawn from ``rng``."""
    sequence = site.sequence(role)
    clean = _signal(scene, sequence, protocol, site.field_t, contrast=(role == "ce"))
    if role == "ce" and sequence != site.t1w:
        # A post-contrast series acquired with another sequence than the T1w (seed 000,
        # Hospital 3: VIBE after a TSE) is scaled like the scanner's automatic scaling would:
        # its pre-contrast signal would have the T1w's mean over the head.
        head = scene.labels != Tissue.AIR
        before = _signal(scene, sequence, protocol, site.field_t, contrast=False)
        reference = _signal(scene, site.t1w, protocol_t1w or protocol,
                            site.field_t, contrast=False)
        clean = clean * float(reference[head].mean() / max(before[head].mean(), 1e-6))
    bias = bias_field(scene.geometry.points(), site.bias,
                      np.random.default_rng(patient.bias_seed)).reshape(scene.shape)
    scaled = clean * bias * (site.intensity_scale * gain)
    if artefacts is not None:
        scaled = artefacts.ghosts(scaled * artefacts.susceptibility(scene, patient, sequence))
    foreground = scaled[scene.labels != Tissue.AIR]
    sigma = site.noise * float(foreground.mean() if foreground.size else 1.0)
    return rician(scaled, sigma, rng)
