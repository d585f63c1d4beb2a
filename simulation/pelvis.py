"""Another body part: a male pelvis, for studies that claim to be head and neck and are not
(what screening must refuse). Implicit shapes in patient LPS mm, centred on the origin: the
body outline, subcutaneous fat, gluteal and iliopsoas muscles, the iliac bones and femoral
heads (cortex and marrow), the bladder (urine: fluid), the rectum and the iliac vessels.
"""

from __future__ import annotations

import numpy as np

from .acquisition import SUBPLANES, Geometry, Scene
from .phantom import Anatomy
from .tissues import Tissue

#: Semi-axes of the body's axial outline (left-right, anterior-posterior), mm.
BODY_MM = (175.0, 120.0)


def _ellipse(p: np.ndarray, centre: tuple[float, float], axes: tuple[float, float]) -> np.ndarray:
    return ((p[:, 0] - centre[0]) / axes[0]) ** 2 + ((p[:, 1] - centre[1]) / axes[1]) ** 2 < 1


def pelvis_anatomy(points: np.ndarray, rng: np.random.Generator) -> Anatomy:
    """The pelvis at patient-coordinate ``points`` (N x 3 mm); ``rng`` varies its size."""
    scale = float(rng.uniform(0.9, 1.1))
    p = points / scale
    labels = np.zeros(len(p), np.uint8)
    body = _ellipse(p, (0, 0), BODY_MM)
    labels[body] = Tissue.SKIN
    labels[body & _ellipse(p, (0, 0), (BODY_MM[0] - 4, BODY_MM[1] - 4))] = Tissue.FAT
    inner = _ellipse(p, (0, 5), (BODY_MM[0] - 28, BODY_MM[1] - 24))
    labels[inner] = Tissue.MUSCLE
    for side in (-1, 1):
        labels[_ellipse(p, (side * 95, 40), (55, 45))] = Tissue.MUSCLE  # gluteal
        wing = _ellipse(p, (side * 100, 10), (40, 25))
        labels[wing] = Tissue.CORTICAL_BONE
        labels[_ellipse(p, (side * 100, 10), (34, 19))] = Tissue.MARROW
        head = _ellipse(p, (side * 85, -10), (26, 26))
        labels[head] = Tissue.CORTICAL_BONE
        labels[_ellipse(p, (side * 85, -10), (22, 22))] = Tissue.MARROW
        labels[_ellipse(p, (side * 55, -35), (6, 6))] = Tissue.ARTERY
        labels[_ellipse(p, (side * 62, -30), (8, 8))] = Tissue.VEIN
    labels[_ellipse(p, (0, -40), (45, 38))] = Tissue.CSF  # the bladder: urine is fluid
    labels[_ellipse(p, (0, 35), (18, 16))] = Tissue.MUCOSA  # rectum
    labels[~body] = Tissue.AIR
    texture = np.where(body, np.sin(p[:, 0] / 9.0) * np.cos(p[:, 1] / 13.0), 0.0)
    return Anatomy(labels, np.zeros(len(p), bool), texture.astype(np.float32),
                   np.zeros(len(p), np.float32))


def pelvis_scene(geometry: Geometry, rng: np.random.Generator) -> Scene:
    """A pelvis on ``geometry`` (as :func:`simulation.acquisition.scene` puts a head)."""
    return Scene(geometry, tuple(pelvis_anatomy(geometry.points(f), rng) for f in SUBPLANES))
