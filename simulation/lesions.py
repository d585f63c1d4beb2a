"""Seed 004's tumour augmentation, rendered with the simulator's physics: extra lesions of
random size, shape, position and necrosis painted into a simulated patient, so that training
meets tumour sizes and morphologies the primary tumours rarely give (seed 000's concern about
unfit data; ``vcemri simulate --lesions N``).

Seed 004's pipeline and what stands in for each step here:

1. *Concentric spheres* (seed 004 FIG. 2, 204): a centre, an outer radius and the radii of two
   inner spheres, each shell carrying a quantised intensity (0.5 outer, 0.75 middle, 1.0
   inner). :class:`ConcentricSpheres`, drawn at random (seed 004: "randomly selected or user
   defined"), from 3 to 30 mm in radius (log-uniform) at head-and-neck sites where NPC and its
   nodes grow.
2. *A 3D tumour mask from the spheres and the anatomy* (G_binary): the outer sphere with a
   smooth random lobulation, kept to soft tissue (no air, bone or brain), as a tumour is.
3. *A 3D quantised intensity map* (G_quantize): every lesion voxel takes the level of the
   (equally lobulated) shell it lies in.
4. *A synthesised lesion in the slices* (G_syn): instead of seed 004's 2D generator, the
   simulator's physics images the lesion: each level becomes tumour tissue with its own
   gadolinium uptake (or necrosis), so T1w, T2w and CE-T1w show one consistent lesion on any
   protocol. The 2D generator is not trained here: it needs real tumour images and a perceptual
   network (VGG, which cannot be downloaded here), and a generator trained per sequence would
   not keep a lesion consistent across the three series, which the physics does by
   construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Vec = tuple[float, float, float]
Morphology = Literal["solid", "rim", "necrotic", "heterogeneous"]

#: Quantised intensity of the outer, middle and inner shell (seed 004 FIG. 2).
LEVELS = (0.5, 0.75, 1.0)

#: Where lesions grow, in the phantom's canonical frame (mm; x left, y posterior, z up, origin
#: at the nasopharynx), with the spread of the centre (mm): the nasopharynx and the
#: parapharyngeal space (primary tumour), retropharyngeal and level II nodes (NPC's first
#: nodal stations), and the oropharynx.
SITES: dict[str, tuple[Vec, Vec]] = {
    "nasopharynx": ((0.0, 8.0, 4.0), (10.0, 4.0, 5.0)),
    "parapharyngeal": ((28.0, 4.0, 0.0), (6.0, 6.0, 6.0)),
    "retropharyngeal node": ((14.0, 24.0, -12.0), (4.0, 4.0, 8.0)),
    "level II node": ((42.0, 8.0, -42.0), (8.0, 10.0, 12.0)),
    "oropharynx": ((8.0, -2.0, -34.0), (8.0, 6.0, 8.0)),
}

#: Outer radius range (mm), drawn log-uniformly: from a 6 mm node to a 6 cm mass.
RADIUS_MM = (3.0, 30.0)


@dataclass(frozen=True)
class ConcentricSpheres:
    """Seed 004's description of a tumour: centre (canonical mm), outer radius (mm), and the
    middle and inner spheres' radii as fractions of the outer one."""

    centre: Vec
    radius_mm: float
    ratios: tuple[float, float]


@dataclass(frozen=True)
class Lesion:
    """One extra lesion: its spheres, its morphology and the gadolinium uptake modulation of
    each quantised level (outer, middle, inner; -1..1 as the phantom's tumour uptake field;
    None: necrotic, no uptake), the lobulation amplitude (fraction of the radius) and a phase
    that makes its texture its own."""

    site: str
    spheres: ConcentricSpheres
    morphology: Morphology
    uptake: tuple[float | None, float | None, float | None]
    lobulation: float
    phase: Vec

    def describe(self) -> dict[str, object]:
        """JSON-serializable summary for cohort.json."""
        return {"site": self.site, "centre_mm": [round(v, 1) for v in self.spheres.centre],
                "radius_mm": round(self.spheres.radius_mm, 2),
                "ratios": [round(r, 3) for r in self.spheres.ratios],
                "morphology": self.morphology,
                "uptake": [None if u is None else round(u, 3) for u in self.uptake]}

    def levels(self, points: np.ndarray, texture: np.ndarray) -> np.ndarray:
        """The quantised intensity map at canonical ``points`` (N x 3 mm): 0 outside the
        lesion, else the level of the shell a point lies in. ``texture`` (-1..1 per point, a
        smooth field) lobulates every sphere alike."""
        spheres = self.spheres
        d = np.linalg.norm(points - np.asarray(spheres.centre, np.float32), axis=1)
        scaled = d / (spheres.radius_mm * (1.0 + self.lobulation * texture))
        out = np.zeros(len(points), np.float32)
        out[scaled < 1.0] = LEVELS[0]
        out[scaled < spheres.ratios[0]] = LEVELS[1]
        out[scaled < spheres.ratios[1]] = LEVELS[2]
        return out


def sample_lesion(rng: np.random.Generator, radius_mm: float | None = None) -> Lesion:
    """One lesion: a site, concentric spheres and a morphology, at random."""
    site = str(rng.choice(list(SITES)))
    (cx, cy, cz), (sx, sy, sz) = SITES[site]
    side = 1.0 if rng.random() < 0.5 else -1.0
    centre = (side * cx + float(rng.normal(0, sx)), cy + float(rng.normal(0, sy)),
              cz + float(rng.normal(0, sz)))
    radius = float(radius_mm if radius_mm is not None
                   else np.exp(rng.uniform(*np.log(RADIUS_MM))))
    middle = float(rng.uniform(0.5, 0.85))
    inner = float(middle * rng.uniform(0.3, 0.8))
    morphology: Morphology = str(rng.choice(("solid", "rim", "necrotic", "heterogeneous")))  # type: ignore[assignment]
    uptake: tuple[float | None, float | None, float | None]
    if morphology == "solid":
        level = float(rng.uniform(-0.3, 0.5))
        uptake = (level, level, level)
    elif morphology == "rim":
        uptake = (float(rng.uniform(0.5, 1.0)), float(rng.uniform(-0.2, 0.3)),
                  float(rng.uniform(-0.8, -0.3)))
    elif morphology == "necrotic":
        uptake = (float(rng.uniform(0.3, 1.0)), float(rng.uniform(-0.2, 0.5)), None)
    else:
        uptake = tuple(float(u) for u in rng.uniform(-0.8, 0.8, 3))  # type: ignore[assignment]
    return Lesion(site, ConcentricSpheres(centre, radius, (middle, inner)), morphology,
                  uptake, float(rng.uniform(0.05, 0.25)),
                  tuple(float(v) for v in rng.uniform(-500, 500, 3)))  # type: ignore[arg-type]


def spheres_from_tumour(intensities: np.ndarray, points_mm: np.ndarray,
                        voxel_mm3: float) -> ConcentricSpheres:
    """Seed 004 FIG. 4: a tumour's concentric spheres by multi-Otsu thresholding and volume
    match. ``intensities`` are the tumour voxels' values (e.g. its CE-T1w), ``points_mm`` their
    positions (N x 3 mm), ``voxel_mm3`` one voxel's volume. The voxels are split into three
    classes; the brightest goes inside: the inner sphere holds its volume, the middle sphere
    that and the next class's, the outer sphere all; centred on the tumour's mass centre.
    Needs scikit-image (its ``threshold_multiotsu``; in the test extra, not the base install:
    simulating lesions does not use this)."""
    from skimage.filters import threshold_multiotsu

    values = np.asarray(intensities, np.float64)
    low, high = threshold_multiotsu(values, classes=3)
    counts = np.array([(values <= low).sum(), ((values > low) & (values <= high)).sum(),
                       (values > high).sum()], float)
    outer = float(np.cbrt(counts.sum() * voxel_mm3 * 3.0 / (4.0 * np.pi)))
    ratios = (float(np.cbrt(counts[1:].sum() / counts.sum())),
              float(np.cbrt(counts[2] / counts.sum())))
    centre = tuple(float(v) for v in np.asarray(points_mm, np.float64).mean(axis=0))
    return ConcentricSpheres(centre, outer, ratios)  # type: ignore[arg-type]
