"""A head-and-neck phantom around the nasopharynx, one per simulated patient.

The anatomy is a set of implicit shapes (ellipsoids, tubes, shells) in a canonical head frame:
x to the patient's left, y posterior, z superior (DICOM LPS), in mm, origin at the
nasopharynx. A patient is the canonical anatomy under a per-patient similarity transform (head
size and shape, position, small rotations) and a smooth random deformation, with an NPC-like
tumour grown from the lateral pharyngeal recess (fossa of Rosenmueller). Labels are evaluated
directly at the voxel centres of any acquisition grid, so every series of a patient sees the
same anatomy and no intermediate volume is resampled.

Everything random comes from the ``numpy.random.Generator`` given to :func:`sample_patient`,
so a seed reproduces a patient exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .lesions import LEVELS, Lesion
from .tissues import Tissue

Vec = tuple[float, float, float]

#: Head outline (semi-axis left-right, semi-axis anterior-posterior, centre y) at heights z
#: (mm): neck, mandible, maxilla and face, skull base, vault.
_OUTLINE_Z = np.array([-90.0, -45.0, -10.0, 20.0, 50.0, 90.0])
_OUTLINE_A = np.array([50.0, 58.0, 68.0, 72.0, 74.0, 62.0])
_OUTLINE_B = np.array([56.0, 70.0, 88.0, 95.0, 95.0, 80.0])
_OUTLINE_YC = np.array([18.0, 4.0, -4.0, 0.0, 6.0, 10.0])


@dataclass(frozen=True)
class Lobe:
    """A sphere of the tumour, in canonical mm."""

    centre: Vec
    radius: float


@dataclass(frozen=True)
class TumourSpec:
    """The tumour of one patient (canonical frame)."""

    side: str  # "left" or "right"
    diameter_mm: float  # nominal equivalent diameter that was drawn
    lobes: tuple[Lobe, ...]
    skull_base_infiltration: bool
    parapharyngeal_infiltration: bool
    necrosis_radius_mm: float  # 0: no necrotic core
    centre: Vec


@dataclass(frozen=True)
class Deformation:
    """Smooth displacement d(p) = sum_k a_k sin(w_k . p + phi_k) (mm)."""

    amplitudes: np.ndarray  # (K, 3)
    frequencies: np.ndarray  # (K, 3), radians per mm
    phases: np.ndarray  # (K,)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        argument = p @ self.frequencies.T + self.phases  # (N, K)
        return (np.sin(argument) @ self.amplitudes).astype(np.float32)


@dataclass(frozen=True)
class Texture:
    """Smooth heterogeneity fields in [-1, 1]: sums of random plane waves (mm frequencies)."""

    frequencies: np.ndarray  # (F, K, 3)
    phases: np.ndarray  # (F, K)

    def __call__(self, p: np.ndarray, which: int) -> np.ndarray:
        waves = np.cos(p @ self.frequencies[which].T + self.phases[which])
        return (waves.sum(axis=1) / np.sqrt(waves.shape[1] * 0.5) / 2.0).clip(-1, 1)


@dataclass(frozen=True)
class Patient:
    """Everything that defines one simulated patient's anatomy."""

    scale: Vec  # head size factors (x, y, z)
    rotation: np.ndarray  # 3 x 3, canonical -> patient
    translation: Vec  # mm, canonical origin in patient coordinates
    deformation: Deformation
    texture: Texture
    tumour: TumourSpec
    bias_seed: int  # the receive-coil bias of this patient's session
    #: extra lesions painted by seed 004's tumour augmentation (simulation/lesions.py)
    lesions: tuple[Lesion, ...] = ()

    def moved(self, rng: np.random.Generator, max_mm: float, max_deg: float) -> Patient:
        """The same patient after a small rigid movement (between two series)."""
        turn = _rotation(rng, max_deg)
        shift = rng.uniform(-max_mm, max_mm, 3)
        return replace(self, rotation=(turn @ self.rotation).astype(np.float32),
                       translation=tuple(float(v) for v in np.asarray(self.translation) + shift))

    def to_canonical(self, points: np.ndarray) -> np.ndarray:
        """Patient coordinates (N x 3 mm) -> canonical coordinates of the anatomy."""
        local = (points - np.asarray(self.translation, np.float32)) @ self.rotation
        local = local / np.asarray(self.scale, np.float32)
        return (local + self.deformation(local)).astype(np.float32)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return (rz @ ry @ rx).astype(np.float32)


def _unit(rng: np.random.Generator, bias: np.ndarray, spread: float) -> np.ndarray:
    v = bias / np.linalg.norm(bias) + rng.normal(0.0, spread, 3)
    return v / np.linalg.norm(v)


def sample_tumour(rng: np.random.Generator, diameter_mm: float | None = None) -> TumourSpec:
    """An NPC-like tumour: 1-5 cm (log-uniform), lobulated, sometimes infiltrative/necrotic.

    It arises in the lateral pharyngeal recess, posterolateral to the airway; larger tumours
    spread medially across the nasopharynx, up into the skull base (clivus, sphenoid) and
    laterally into the parapharyngeal space, as NPC does (T-staging pattern).
    """
    side = "left" if rng.random() < 0.5 else "right"
    sign = 1.0 if side == "left" else -1.0
    d = float(diameter_mm if diameter_mm is not None
              else np.exp(rng.uniform(np.log(10), np.log(50))))
    radius = d / 2.0
    # The bigger the tumour, the more it grows medially, posteriorly and upwards.
    growth = (radius - 5.0) / 20.0
    centre = np.array([sign * (11.0 - 6.0 * growth), 7.0 + 3.0 * growth, 5.0 + 5.0 * growth])
    skull_base = bool(radius > 12.0 and rng.random() < 0.3 + 0.6 * growth)
    parapharyngeal = bool(radius > 10.0 and rng.random() < 0.25 + 0.5 * growth)
    core = radius * 0.94  # lobes and wobble: equivalent diameter ~ the drawn diameter
    lobes = [Lobe(tuple(centre), core)]
    for _ in range(int(rng.integers(2, 6))):
        direction = _unit(rng, np.array([sign * 0.6, 0.5, 0.3]), 0.8)
        lobes.append(Lobe(tuple(centre + direction * core * rng.uniform(0.45, 0.85)),
                          core * rng.uniform(0.4, 0.7)))
    if skull_base:
        for k in range(2):
            lobes.append(Lobe(tuple(centre + np.array([0.0, 4.0 + 3 * k, core * (0.8 + 0.5 * k)])),
                              max(4.0, core * rng.uniform(0.35, 0.55))))
    if parapharyngeal:
        lobes.append(Lobe(tuple(centre + np.array([sign * core * 0.9, -3.0, -2.0])),
                          max(4.0, core * rng.uniform(0.4, 0.6))))
    necrosis = (float(radius * rng.uniform(0.25, 0.4))
                if radius > 15.0 and rng.random() < 0.6 else 0.0)
    return TumourSpec(side, d, tuple(lobes), skull_base, parapharyngeal, necrosis,
                      tuple(float(c) for c in centre))


def sample_patient(rng: np.random.Generator, tumour_diameter_mm: float | None = None) -> Patient:
    """Draw one patient: head size/shape +-5 %, position +-5 mm, rotation +-3 degrees, a
    ~2.5 mm smooth deformation, tissue textures and a tumour."""
    base = rng.normal(1.0, 0.04)
    scale = tuple(float(base * s) for s in rng.normal(1.0, 0.025, 3))
    wavelength = rng.uniform(80.0, 200.0, (4, 1))
    directions = rng.normal(size=(4, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    deformation = Deformation(
        amplitudes=rng.normal(0.0, 1.2, (4, 3)).astype(np.float32),
        frequencies=(2 * np.pi / wavelength * directions).astype(np.float32),
        phases=rng.uniform(0, 2 * np.pi, 4).astype(np.float32),
    )
    # Texture fields: 0 tissue PD/T1 heterogeneity, 1 tumour enhancement, 2 cortex folding.
    wavelengths = np.stack([rng.uniform(6.0, 30.0, (12, 1)), rng.uniform(5.0, 18.0, (12, 1)),
                            rng.uniform(8.0, 16.0, (12, 1))])
    wave_dirs = rng.normal(size=(3, 12, 3))
    wave_dirs /= np.linalg.norm(wave_dirs, axis=2, keepdims=True)
    texture = Texture((2 * np.pi / wavelengths * wave_dirs).astype(np.float32),
                      rng.uniform(0, 2 * np.pi, (3, 12)).astype(np.float32))
    return Patient(
        scale=scale,  # type: ignore[arg-type]
        rotation=_rotation(rng, 3.0),
        translation=tuple(float(v) for v in rng.uniform(-5.0, 5.0, 3)),  # type: ignore[arg-type]
        deformation=deformation,
        texture=texture,
        tumour=sample_tumour(rng, tumour_diameter_mm),
        bias_seed=int(rng.integers(0, 2**32)),
    )


# ----------------------------------------------------------------------------------------
# Implicit shapes, evaluated on canonical points sorted by z: a shape only looks at the slab
# of points inside its z extent, which keeps a 256x256x30 series well under a second.
# ----------------------------------------------------------------------------------------

Mask = tuple[slice, np.ndarray]


class _Space:
    """Canonical points (sorted by z) and the tissue labels painted on them."""

    def __init__(self, p: np.ndarray) -> None:
        self.p = p
        self.z = p[:, 2]
        self.labels = np.zeros(len(p), np.uint8)

    def slab(self, z0: float, z1: float) -> slice:
        return slice(int(np.searchsorted(self.z, z0)), int(np.searchsorted(self.z, z1, "right")))

    def d2(self, centre: Vec, radii: Vec, sl: slice) -> np.ndarray:
        """Squared normalized radius of the ellipsoid (< 1 inside) on the points of ``sl``."""
        q = (self.p[sl] - np.asarray(centre, np.float32)) / np.asarray(radii, np.float32)
        return np.einsum("ij,ij->i", q, q)

    def ellipsoid(self, centre: Vec, radii: Vec, sl: slice | None = None) -> Mask:
        if sl is None:
            sl = self.slab(centre[2] - radii[2], centre[2] + radii[2])
        return sl, self.d2(centre, radii, sl) < 1.0

    def tube(self, x: float, y: float, rx: float, ry: float, z0: float, z1: float,
             sl: slice | None = None) -> Mask:
        """An elliptic cylinder along z between z0 and z1."""
        if sl is None:
            sl = self.slab(z0, z1)
        q = self.p[sl]
        inside = ((q[:, 0] - x) / rx) ** 2 + ((q[:, 1] - y) / ry) ** 2 < 1.0
        return sl, inside & (q[:, 2] > z0) & (q[:, 2] < z1)

    def paint(self, mask: Mask, tissue: Tissue, where: np.ndarray | None = None) -> None:
        sl, inside = mask
        if where is not None:
            inside = inside & where[sl]
        self.labels[sl][inside] = tissue

    def full(self, mask: Mask) -> np.ndarray:
        out = np.zeros(len(self.p), bool)
        out[mask[0]] = mask[1]
        return out

    def bone(self, outer: Mask, inner: Mask, where: np.ndarray | None = None) -> None:
        """Cortical bone on ``outer``, marrow where ``inner`` (evaluated on ``outer``'s slab)
        is inside it too."""
        assert inner[0] == outer[0], "evaluate the marrow on the cortex's slab"
        self.paint(outer, Tissue.CORTICAL_BONE, where)
        self.paint((outer[0], inner[1] & outer[1]), Tissue.MARROW, where)


def _outline(z: np.ndarray, inset: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.interp(z, _OUTLINE_Z, _OUTLINE_A) - inset
    b = np.interp(z, _OUTLINE_Z, _OUTLINE_B) - inset
    yc = np.interp(z, _OUTLINE_Z, _OUTLINE_YC)
    return a, b, yc


def _inside_outline(p: np.ndarray, inset: float) -> np.ndarray:
    a, b, yc = _outline(p[:, 2], inset)
    # A superellipse (exponent 2.4) is squarer than an ellipse, like a head in axial section.
    r = np.abs(p[:, 0] / a) ** 2.4 + np.abs((p[:, 1] - yc) / b) ** 2.4
    vertical = (p[:, 2] > _OUTLINE_Z[0] + inset) & (p[:, 2] < _OUTLINE_Z[-1] - inset)
    return (r < 1.0) & vertical


def _tumour(patient: Patient, space: _Space) -> tuple[np.ndarray, np.ndarray]:
    """(tumour, necrosis) masks on the space's points.

    The outline is the union of the lobes with a smooth radial perturbation (lobulation, up
    to 18 %); it stays below the skull base's upper surface.
    """
    spec = patient.tumour
    tumour = np.zeros(len(space.p), bool)
    necrosis = np.zeros(len(space.p), bool)
    low = min(lobe.centre[2] - lobe.radius * 1.18 for lobe in spec.lobes)
    high = min(34.0, max(lobe.centre[2] + lobe.radius * 1.18 for lobe in spec.lobes))
    sl = space.slab(low, high)
    nearest = np.full(sl.stop - sl.start, np.inf, np.float32)
    for lobe in spec.lobes:
        nearest = np.minimum(nearest, space.d2(lobe.centre, (lobe.radius,) * 3, sl))
    candidates = np.flatnonzero(nearest < 1.18**2)
    points = space.p[sl][candidates]
    wobble = 1.0 + 0.18 * patient.texture(points, 1)
    inside = nearest[candidates] < wobble**2
    tumour[sl.start + candidates[inside]] = True
    if spec.necrosis_radius_mm > 0:
        core = points[inside]
        q = (core - np.asarray(spec.centre, np.float32)) / spec.necrosis_radius_mm
        dead = np.einsum("ij,ij->i", q, q) < (1.0 + 0.3 * patient.texture(core, 0)) ** 2
        necrosis[sl.start + candidates[inside][dead]] = True
    return tumour, necrosis


@dataclass(frozen=True)
class Anatomy:
    """The phantom evaluated at a set of points (all arrays have one entry per point)."""

    labels: np.ndarray  # uint8 Tissue values
    tumour: np.ndarray  # bool, tumour including necrosis (the ground-truth GTV)
    texture: np.ndarray  # float32 in [-1, 1], tissue heterogeneity field
    uptake: np.ndarray  # float32 in [-1, 1], tumour enhancement heterogeneity (0 elsewhere)


def anatomy(patient: Patient, points: np.ndarray) -> Anatomy:
    """The patient's anatomy at patient-coordinate ``points`` (N x 3 mm)."""
    canonical = patient.to_canonical(points.astype(np.float32))
    head_index = np.flatnonzero(_inside_outline(canonical, 0.0))
    order = np.argsort(canonical[head_index, 2], kind="stable")
    index = head_index[order]
    space = _Space(canonical[index])
    _paint_anatomy(patient, space)

    labels = np.zeros(len(points), np.uint8)
    labels[index] = space.labels
    tumour = np.zeros(len(points), bool)
    texture = np.zeros(len(points), np.float32)
    uptake = np.zeros(len(points), np.float32)
    texture[index] = patient.texture(space.p, 0)
    in_tumour, necrotic = _tumour(patient, space)
    brain = np.isin(space.labels, (Tissue.GREY_MATTER, Tissue.WHITE_MATTER, Tissue.CEREBELLUM,
                                   Tissue.CSF, Tissue.SPINAL_CORD))
    in_tumour &= ~brain  # the skull base protects the brain
    if not patient.tumour.skull_base_infiltration:
        in_tumour &= ~np.isin(space.labels, (Tissue.CORTICAL_BONE, Tissue.MARROW))
    space.labels[in_tumour] = Tissue.TUMOUR
    space.labels[in_tumour & necrotic] = Tissue.NECROSIS
    uptake[index[in_tumour]] = patient.texture(space.p[in_tumour], 1)
    if patient.lesions:
        extra, dead, extra_uptake = _lesions(patient, space)
        space.labels[extra] = Tissue.TUMOUR
        space.labels[dead] = Tissue.NECROSIS
        in_tumour |= extra
        uptake[index[extra]] = extra_uptake[extra]
    labels[index] = space.labels
    tumour[index] = in_tumour
    return Anatomy(labels, tumour, texture, uptake)


#: Tissues a lesion may grow into (seed 004's G_binary keeps a tumour to its anatomy).
_LESION_GROWS_IN = (Tissue.FAT, Tissue.MUSCLE, Tissue.MUCOSA, Tissue.PAROTID, Tissue.TUMOUR,
                    Tissue.NECROSIS)


def _lesions(patient: Patient, space: _Space) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lesion, necrosis, uptake) on the space's points for the patient's extra lesions: each
    lesion's quantised map (simulation/lesions.py) on the soft tissue it overlaps, necrotic
    levels as necrosis, the others with their level's uptake plus the tumour's texture."""
    lesion = np.zeros(len(space.p), bool)
    necrosis = np.zeros(len(space.p), bool)
    uptake = np.zeros(len(space.p), np.float32)
    soft = np.isin(space.labels, _LESION_GROWS_IN)
    for spec in patient.lesions:
        spheres = spec.spheres
        reach = spheres.radius_mm * (1.0 + spec.lobulation)
        sl = space.slab(spheres.centre[2] - reach, spheres.centre[2] + reach)
        near = sl.start + np.flatnonzero(space.d2(spheres.centre, (reach,) * 3, sl) < 1.0)
        near = near[soft[near]]
        field = patient.texture(space.p[near] + np.asarray(spec.phase, np.float32), 1)
        levels = spec.levels(space.p[near], field)
        for level, value in zip(LEVELS, spec.uptake, strict=True):
            chosen = levels == level
            if value is None:
                necrosis[near[chosen]] = True
            else:
                uptake[near[chosen]] = np.clip(value + 0.3 * field[chosen], -1.0, 1.0)
            lesion[near[chosen]] = True
    necrosis &= lesion
    return lesion, necrosis, uptake


def _paint_anatomy(patient: Patient, s: _Space) -> None:
    """Paint the normal anatomy, outside in; later structures replace earlier ones."""
    p = s.p
    everything = slice(0, len(p))
    s.labels[:] = Tissue.SKIN
    s.paint((everything, _inside_outline(p, 2.0)), Tissue.FAT)
    soft = _inside_outline(p, 8.0)
    s.paint((everything, soft), Tissue.MUSCLE)
    s.paint(s.ellipsoid((0, -52, -5), (40, 18, 30)), Tissue.FAT, soft)  # facial fat
    for sx in (-1, 1):
        s.paint(s.ellipsoid((sx * 38, 30, -50), (12, 22, 30)), Tissue.FAT, soft)

    # Skull vault, brain, temporal lobes, posterior fossa.
    vault = (0, 8, 52)
    vault_all = s.slab(-10.0, 120.0)
    z = p[:, 2]
    cranium = np.zeros(len(p), bool)
    intracranial = np.zeros(len(p), bool)
    cranium |= s.full(s.ellipsoid(vault, (67, 86, 58))) & (z > 22)
    intracranial |= s.full(s.ellipsoid(vault, (60, 79, 51))) & (z > 26)
    fossa = (0, 46, 22)
    cranium |= s.full(s.ellipsoid(fossa, (52, 36, 26)))
    intracranial |= s.full(s.ellipsoid(fossa, (46, 30, 20)))
    temporal = []
    for sx in (-1, 1):
        cranium |= s.full(s.ellipsoid((sx * 40, 2, 26), (22, 32, 17)))
        inner = s.full(s.ellipsoid((sx * 40, 2, 26), (17, 27, 12)))
        temporal.append(inner)
        intracranial |= inner
    s.paint((everything, cranium & ~intracranial), Tissue.CORTICAL_BONE)
    diploe = s.full(s.ellipsoid(vault, (64.5, 83.5, 55.5))) & ~s.full(
        s.ellipsoid(vault, (62, 81, 53)))
    s.paint((everything, cranium & ~intracranial & diploe), Tissue.MARROW)
    s.paint((everything, intracranial), Tissue.CSF)
    # Gyri: the grey-white borders undulate with a smooth texture.
    sl = vault_all
    d2 = s.d2(vault, (58, 77, 49), sl)
    near = np.flatnonzero(d2 < 1.03**2)
    folding = np.ones_like(d2)
    folding[near] = (1.0 + 0.03 * patient.texture(p[sl][near], 2)) ** 2
    upper = intracranial[sl] & (z[sl] > 26)
    s.paint((sl, upper & (d2 < folding)), Tissue.GREY_MATTER)
    white = s.d2(vault, (53, 71, 45), sl) < folding
    s.paint((sl, upper & white), Tissue.WHITE_MATTER)
    for lobe in temporal:
        s.paint((everything, lobe & (z <= 26)), Tissue.GREY_MATTER)
    for sx in (-1, 1):
        s.paint(s.ellipsoid((sx * 9, 14, 62), (6, 22, 9)), Tissue.CSF)  # lateral ventricles
    s.paint(s.ellipsoid((0, 50, 20), (44, 27, 18)), Tissue.CEREBELLUM, intracranial)
    s.paint(s.ellipsoid((0, 26, 18), (12, 11, 24)), Tissue.WHITE_MATTER)  # brainstem
    s.paint(s.ellipsoid((0, 32, 18), (3, 2, 3)), Tissue.CSF)  # fourth ventricle

    # Skull base: sphenoid body and clivus, petrous bones.
    outer = s.ellipsoid((0, 4, 21), (26, 40, 7))
    s.bone(outer, s.ellipsoid((0, 4, 21), (22, 36, 4.5), outer[0]), ~intracranial)
    outer = s.ellipsoid((0, 18, 14), (11, 8, 16))
    s.bone(outer, s.ellipsoid((0, 18, 14), (8.5, 5.5, 13.5), outer[0]))
    for sx in (-1, 1):
        outer = s.ellipsoid((sx * 32, 22, 20), (18, 9, 7))
        s.bone(outer, s.ellipsoid((sx * 32, 22, 20), (15, 6.5, 4.5), outer[0]), ~intracranial)

    # Sinuses and nasal cavity: air with a mucosal lining.
    sl = s.slab(12.0, 36.0)
    sphenoid = s.d2((0, -4, 24), (14, 11, 8), sl)
    s.paint((sl, sphenoid < 1.0), Tissue.MUCOSA, ~intracranial)
    s.paint((sl, sphenoid < 0.7), Tissue.AIR, ~intracranial)
    for sx in (-1, 1):
        sl = s.slab(-14.0, 18.0)
        maxillary = s.d2((sx * 27, -42, 2), (13, 16, 15), sl)
        s.paint((sl, maxillary < 1.0), Tissue.CORTICAL_BONE)
        s.paint((sl, maxillary < 0.85), Tissue.MUCOSA)
        s.paint((sl, maxillary < 0.7), Tissue.AIR)
    sl = s.slab(-6.0, 22.0)
    q = p[sl]
    nasal = (np.abs(q[:, 0]) < 15) & (q[:, 1] > -75) & (q[:, 1] < -16)
    s.paint((sl, nasal), Tissue.MUCOSA)
    turbinate = 4.0 + 2.0 * np.cos(q[:, 2] * 0.45)
    s.paint((sl, nasal & (np.abs(q[:, 0]) > 2.0) & (np.abs(q[:, 0]) < 15 - turbinate)), Tissue.AIR)
    s.paint((sl, nasal & (np.abs(q[:, 0]) < 1.0)), Tissue.CORTICAL_BONE)  # septum

    # Prevertebral muscles (longus colli/capitis), cervical spine and canal.
    for sx in (-1, 1):
        s.paint(s.tube(sx * 9.0, 15.0, 7.0, 5.0, -90.0, 12.0), Tissue.MUSCLE)
    outer = s.tube(0.0, 31.0, 13.0, 10.0, -90.0, -3.0)
    s.bone(outer, s.tube(0.0, 31.0, 11.0, 8.0, -90.0, -4.5, outer[0]))
    outer = s.tube(0.0, 28.0, 6.0, 6.0, -12.0, 4.0)
    s.bone(outer, s.tube(0.0, 28.0, 4.5, 4.5, -12.0, 2.5, outer[0]))
    sl, ring = s.tube(0.0, 58.0, 22.0, 16.0, -90.0, -2.0)
    _, hole = s.tube(0.0, 56.0, 16.0, 11.0, -90.0, -2.0, sl)
    s.paint((sl, ring & ~hole & (p[sl][:, 1] > 40)), Tissue.CORTICAL_BONE)
    s.paint(s.tube(0.0, 52.0, 9.0, 8.0, -90.0, 8.0), Tissue.CSF)
    s.paint(s.tube(0.0, 52.0, 5.0, 4.5, -90.0, 8.0), Tissue.SPINAL_CORD)

    # Pterygoid muscles, parapharyngeal fat, mandible, tongue, parotid glands.
    for sx in (-1, 1):
        s.paint(s.ellipsoid((sx * 27, -4, -8), (9, 15, 22)), Tissue.MUSCLE)
        s.paint(s.ellipsoid((sx * 18, 4, -4), (5, 8, 16)), Tissue.FAT)
        outer = s.ellipsoid((sx * 46, -10, -32), (5.5, 14, 30))
        s.bone(outer, s.ellipsoid((sx * 46, -10, -32), (3.5, 11.5, 27), outer[0]))
        s.paint(s.ellipsoid((sx * 50, 10, -18), (11, 16, 21)), Tissue.PAROTID)
    sl = s.slab(-72.0, -50.0)
    q = p[sl]
    radial = np.hypot(q[:, 0], q[:, 1] + 14.0)
    body = (np.abs(radial - 44.0) < 5.5) & (q[:, 1] < -14.0)
    s.paint((sl, body), Tissue.CORTICAL_BONE)
    s.paint((sl, body & (np.abs(radial - 44.0) < 3.5) & (q[:, 2] > -70) & (q[:, 2] < -52)),
            Tissue.MARROW)
    sl, tongue = s.ellipsoid((0, -34, -42), (24, 28, 20))
    s.paint((sl, tongue), Tissue.MUSCLE)
    s.paint((sl, tongue & (np.abs(p[sl][:, 0]) < 1.5)), Tissue.FAT)  # lingual septum

    # Airway: nasopharynx and oropharynx with mucosa (thicker on the posterior wall).
    s.paint(s.ellipsoid((0, 2, 4), (17, 11, 16)), Tissue.MUCOSA)
    s.paint(s.ellipsoid((0, -2, 4), (12, 6.5, 13)), Tissue.AIR)
    s.paint(s.tube(0.0, -3.0, 14.0, 9.0, -75.0, -8.0), Tissue.MUCOSA)
    s.paint(s.tube(0.0, -4.0, 11.0, 6.0, -75.0, -6.0), Tissue.AIR)
    s.paint(s.tube(0.0, -6.0, 6.0, 5.0, -6.0, 8.0), Tissue.AIR)  # joins the nasal cavity
    for sx in (-1, 1):  # lateral recesses (fossae of Rosenmueller)
        s.paint(s.ellipsoid((sx * 12, 5, 4), (3, 2.5, 6)), Tissue.AIR)

    # Vessels: internal carotids, internal jugular veins, vertebral and facial arteries.
    for sx in (-1, 1):
        s.paint(s.tube(sx * 21.0, 17.0, 2.8, 2.8, -90.0, 24.0), Tissue.ARTERY)
        s.paint(s.tube(sx * 31.0, 25.0, 4.5, 5.5, -90.0, 14.0), Tissue.VEIN)
        s.paint(s.tube(sx * 15.0, 40.0, 1.8, 1.8, -90.0, -3.0), Tissue.ARTERY)
        s.paint(s.tube(sx * 32.0, -18.0, 1.8, 1.8, -90.0, -20.0), Tissue.ARTERY)
