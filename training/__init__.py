"""Simulated cohorts, datasets, registration, mixture modelling, the trainer (DDP), evaluation
tables, figures and reports. Imports ``config`` and ``synthesis``.

Today: the multi-institution NPC cohort simulator (``vcemri simulate``).
"""

from typing import Any

from .cli import add_commands
from .institutions import INSTITUTIONS, Institution, Sequence

_LAZY = {"MANIFEST", "PatientRecord", "SimulationOptions", "simulate_cohort", "simulate_patient"}


def __getattr__(name: str) -> Any:
    # The simulator imports highdicom and SimpleITK; load it on first use so that
    # `vcemri --help` and the other commands start fast.
    if name in _LAZY:
        from . import simulate

        return getattr(simulate, name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")

__all__ = [
    "INSTITUTIONS",
    "MANIFEST",
    "Institution",
    "PatientRecord",
    "Sequence",
    "SimulationOptions",
    "add_commands",
    "simulate_cohort",
    "simulate_patient",
]
