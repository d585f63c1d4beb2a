"""What was simulated for one patient: the record cohort.json keeps, and the preview draws."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PatientRecord:
    """What was simulated for one patient (JSON-serializable)."""

    patient: str
    institution: str
    paths: dict[str, str]  # role -> path relative to the cohort directory
    tumour_side: str
    tumour_volume_ml: float
    tumour_equivalent_diameter_mm: float
    skull_base_infiltration: bool
    parapharyngeal_infiltration: bool
    necrosis: bool
    protocols: dict[str, dict[str, float]]
    gain: float
    misalignment: dict[str, list[float]] = field(default_factory=dict)
    #: the drawn scanner, protocol and anatomy of a randomised-protocol patient
    randomized: dict[str, object] | None = None
    #: seed 004's extra lesions (simulation/lesions.py), beside the primary tumour
    lesions: list[dict[str, object]] = field(default_factory=list)
    #: the slices the preview shows (T1w, T2w, CE-T1w and the tumour mask), when asked for
    preview: dict[str, list[list[float]]] | None = field(default=None, repr=False)
