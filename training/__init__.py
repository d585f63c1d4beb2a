"""Simulated cohorts, datasets, mixture modelling, the trainer (objectives, DDP, AMP),
evaluation tables, paired tests, figures and reports. Imports ``config`` and ``synthesis``.

Commands: ``vcemri simulate``, ``vcemri train``, ``vcemri evaluate``.
"""

from importlib import import_module
from typing import Any

from .cli import add_commands
from .institutions import INSTITUTIONS, Institution, Sequence

# The simulator, trainer and evaluation import highdicom, SimpleITK and torch; load them on
# first use so that `vcemri --help` and the other commands start fast.
_LAZY = {
    "MANIFEST": "simulate", "PatientRecord": "simulate", "SimulationOptions": "simulate",
    "simulate_cohort": "simulate", "simulate_patient": "simulate",
    "TrainOptions": "trainer", "TrainResult": "trainer", "train": "trainer",
    "autocast_for": "trainer", "PairedObjective": "objectives", "CycleObjective": "objectives",
    "Evaluation": "evaluate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")


__all__ = [
    "INSTITUTIONS",
    "MANIFEST",
    "CycleObjective",
    "Evaluation",
    "Institution",
    "PairedObjective",
    "PatientRecord",
    "Sequence",
    "SimulationOptions",
    "TrainOptions",
    "TrainResult",
    "add_commands",
    "autocast_for",
    "simulate_cohort",
    "simulate_patient",
    "train",
]
