"""Tissue classes of the head-and-neck phantom and their MR properties.

Relaxation times are in ms, proton density (PD) relative to water, gadolinium concentration in
mmol/L early (< 30 s) after a 0.1 mmol/kg injection (seed 000 Table 1).

Sources, rounded: Stanisz et al., MRM 54:507 (2005) for white and grey matter, muscle, blood at
1.5 T and 3 T; de Bazelaire et al., Radiology 230:652 (2004) for fat and bone marrow; Bojorquez
et al., MRI 35:69 (2017) review for CSF and cortical bone. Mucosa, parotid, nasopharyngeal
carcinoma and necrosis have no single reference value; they are chosen inside published ranges
(intermediate T1, intermediate-to-high T2 for NPC, as in NPC staging MRI). The tumour and normal
mucosa are deliberately close in T1 and T2 but far apart in gadolinium uptake: enhancement
cannot be read off T1w and T2w intensities alone, so synthesis is a genuine learning problem.

Gadolinium relaxivity of Gd-DOTA in plasma (Rohrer et al., Invest Radiol 40:715, 2005):
r1 = 3.6 /mM/s at 1.5 T and 3.5 /mM/s at 3 T; r2 = 4.3 and 4.9 /mM/s.

Apparent diffusion coefficients (ADC, mm^2/s, the same at 1.5 T and 3 T) are in
:data:`ADC_MM2_S` with their sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    """Label values of the phantom's tissue map."""

    AIR = 0
    SKIN = 1
    FAT = 2
    MUSCLE = 3
    CORTICAL_BONE = 4
    MARROW = 5
    GREY_MATTER = 6
    WHITE_MATTER = 7
    CSF = 8
    CEREBELLUM = 9
    MUCOSA = 10
    PAROTID = 11
    ARTERY = 12
    VEIN = 13
    TUMOUR = 14
    NECROSIS = 15
    SPINAL_CORD = 16


@dataclass(frozen=True)
class TissueProperties:
    """MR properties of one tissue at one field strength."""

    t1_ms: float
    t2_ms: float
    pd: float
    gd_mmol: float  # early post-contrast gadolinium concentration
    texture: float  # relative amplitude of smooth intra-tissue heterogeneity (PD and T1)


# (T1 at 1.5 T, T1 at 3 T, T2 at 1.5 T, T2 at 3 T, PD, Gd, texture)
_TABLE: dict[Tissue, tuple[float, float, float, float, float, float, float]] = {
    Tissue.AIR: (1.0e4, 1.0e4, 1.0, 1.0, 0.0, 0.0, 0.0),
    Tissue.SKIN: (620, 820, 40, 36, 0.70, 0.06, 0.05),
    Tissue.FAT: (343, 382, 58, 68, 0.90, 0.02, 0.04),  # de Bazelaire: subcutaneous fat
    Tissue.MUSCLE: (1008, 1412, 44, 50, 0.72, 0.05, 0.06),  # Stanisz: skeletal muscle
    Tissue.CORTICAL_BONE: (300, 320, 1.0, 0.8, 0.05, 0.0, 0.0),
    Tissue.MARROW: (549, 586, 49, 49, 0.85, 0.08, 0.08),  # de Bazelaire: bone marrow
    Tissue.GREY_MATTER: (1124, 1820, 95, 99, 0.80, 0.0, 0.04),  # Stanisz
    Tissue.WHITE_MATTER: (884, 1084, 72, 69, 0.69, 0.0, 0.03),  # Stanisz
    Tissue.CSF: (4070, 4160, 1800, 1700, 1.00, 0.0, 0.01),
    Tissue.CEREBELLUM: (1000, 1450, 85, 84, 0.76, 0.0, 0.05),
    Tissue.MUCOSA: (1050, 1450, 92, 86, 0.82, 0.16, 0.10),
    Tissue.PAROTID: (780, 950, 80, 74, 0.80, 0.18, 0.10),
    Tissue.ARTERY: (1441, 1932, 290, 275, 0.85, 2.00, 0.0),  # Stanisz: blood
    Tissue.VEIN: (1441, 1932, 200, 180, 0.85, 1.20, 0.0),
    Tissue.TUMOUR: (1100, 1500, 90, 84, 0.83, 0.55, 0.22),
    Tissue.NECROSIS: (1700, 2200, 160, 150, 0.90, 0.0, 0.10),
    Tissue.SPINAL_CORD: (745, 993, 74, 78, 0.70, 0.0, 0.03),  # Stanisz: optic nerve / cord
}

#: Apparent diffusion coefficient of each tissue (mm^2/s) for diffusion-weighted imaging
#: (simulation/diffusion.py). Typical published values, rounded:
#:
#: - CSF 3.0e-3: free water at 37 C (Holz, Heil & Sacco, PCCP 2:4740, 2000: 2.3e-3 at 25 C,
#:   about 3.0e-3 at body temperature), as measured in the ventricles;
#: - grey matter 0.8e-3, white matter 0.7e-3, cerebellum 0.75e-3: Helenius et al., AJNR
#:   23:194 (2002), normal adult brain (cerebellum chosen between their grey and white values);
#: - nasopharyngeal carcinoma 0.8e-3: restricted diffusion of a cellular tumour, NPC ADC
#:   0.7-0.9e-3 in the literature (e.g. Fong et al., Oral Oncol 46:603, 2010); carcinomas in
#:   Wang et al., Radiology 220:621 (2001) average about 1.1e-3, lymphoma 0.66e-3;
#: - necrosis 2.0e-3: near free fluid, as benign cystic lesions in Wang et al. (2.05e-3);
#: - muscle 1.4e-3 (skeletal muscle 1.3-1.6e-3), mucosa 1.5e-3, parotid 1.1e-3, skin 1.0e-3,
#:   spinal cord 1.0e-3 (mean diffusivity), bone marrow 0.5e-3 (adult vertebral marrow 0.2-0.6
#:   e-3) and fat 0.05e-3 (almost no water; fat is suppressed in DWI anyway): chosen inside
#:   published ranges, no single reference;
#: - blood 2.5e-3: flowing blood loses its signal at any b > 0 (pseudo-diffusion, IVIM),
#:   besides the spin echo's flow void; chosen, not measured;
#: - cortical bone and air give no signal, so their value does not matter (0).
#:
#: The tumour's ADC is far below the mucosa's (0.8 vs 1.5e-3): this is why DWI helps find
#: NPC, whose T1 and T2 are close to the mucosa's.
ADC_MM2_S: dict[Tissue, float] = {
    Tissue.AIR: 0.0,
    Tissue.SKIN: 1.0e-3,
    Tissue.FAT: 0.05e-3,
    Tissue.MUSCLE: 1.4e-3,
    Tissue.CORTICAL_BONE: 0.0,
    Tissue.MARROW: 0.5e-3,
    Tissue.GREY_MATTER: 0.8e-3,
    Tissue.WHITE_MATTER: 0.7e-3,
    Tissue.CSF: 3.0e-3,
    Tissue.CEREBELLUM: 0.75e-3,
    Tissue.MUCOSA: 1.5e-3,
    Tissue.PAROTID: 1.1e-3,
    Tissue.ARTERY: 2.5e-3,
    Tissue.VEIN: 2.5e-3,
    Tissue.TUMOUR: 0.8e-3,
    Tissue.NECROSIS: 2.0e-3,
    Tissue.SPINAL_CORD: 1.0e-3,
}

#: Gadolinium relaxivities (/mM/s) by field strength (Rohrer 2005, Gd-DOTA in plasma).
R1_PER_MM_S = {1.5: 3.6, 3.0: 3.5}
R2_PER_MM_S = {1.5: 4.3, 3.0: 4.9}


def _nearest_field(field_t: float) -> float:
    return 1.5 if abs(field_t - 1.5) <= abs(field_t - 3.0) else 3.0


def properties(tissue: Tissue, field_t: float) -> TissueProperties:
    """Properties of ``tissue`` at ``field_t`` tesla (interpolated linearly in field)."""
    t1_15, t1_3, t2_15, t2_3, pd, gd, texture = _TABLE[tissue]
    w = float(np.clip((field_t - 1.5) / 1.5, 0.0, 1.0))
    return TissueProperties(
        t1_ms=t1_15 + w * (t1_3 - t1_15),
        t2_ms=t2_15 + w * (t2_3 - t2_15),
        pd=pd,
        gd_mmol=gd,
        texture=texture,
    )


def property_maps(labels: np.ndarray, field_t: float) -> dict[str, np.ndarray]:
    """Look-up tables applied to a label map: t1_ms, t2_ms, pd, gd_mmol, texture arrays."""
    count = max(int(t) for t in Tissue) + 1
    tables = {name: np.zeros(count, np.float32) for name in ("t1_ms", "t2_ms", "pd", "gd_mmol",
                                                              "texture")}
    for tissue in Tissue:
        props = properties(tissue, field_t)
        for name in tables:
            tables[name][tissue] = getattr(props, name)
    return {name: table[labels] for name, table in tables.items()}


def adc_map(labels: np.ndarray) -> np.ndarray:
    """:data:`ADC_MM2_S` applied to a label map (float32, mm^2/s)."""
    table = np.zeros(max(int(t) for t in Tissue) + 1, np.float32)
    for tissue, value in ADC_MM2_S.items():
        table[tissue] = value
    return table[labels]


def relaxivity(field_t: float) -> tuple[float, float]:
    """(r1, r2) of the contrast agent in /mM/s at the nearest tabulated field strength."""
    field = _nearest_field(field_t)
    return R1_PER_MM_S[field], R2_PER_MM_S[field]
