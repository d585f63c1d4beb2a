"""Simulated cohorts, datasets, registration, mixture modelling, the trainer (DDP), evaluation
tables, figures and reports. Imports ``config`` and ``synthesis``.

Today: the multi-institution NPC cohort simulator (``vcemri simulate``).
"""

from .cli import add_commands
from .institutions import INSTITUTIONS, Institution, Sequence
from .simulate import MANIFEST, PatientRecord, SimulationOptions, simulate_cohort

__all__ = [
    "INSTITUTIONS",
    "MANIFEST",
    "Institution",
    "PatientRecord",
    "Sequence",
    "SimulationOptions",
    "add_commands",
    "simulate_cohort",
]
