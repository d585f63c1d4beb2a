"""Datasets from manifests, mixture modelling, the trainer (objectives, DDP, AMP), evaluation
tables, paired tests, figures and reports. Imports ``config``, ``synthesis`` and ``planning``
(evaluation scores exactly what the node delivers).

Commands: ``vcemri train``, ``vcemri evaluate``.
"""

from config import lazy_attributes

from .cli import add_commands

# The trainer and evaluation import torch, SimpleITK and matplotlib; load them on first use
# so that `vcemri --help` and the other commands start fast.
_LAZY = {
    "TrainOptions": "trainer", "TrainResult": "trainer", "train": "trainer",
    "autocast_for": "trainer", "PairedObjective": "objectives", "CycleObjective": "objectives",
    "Evaluation": "evaluate",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "CycleObjective",
    "Evaluation",
    "PairedObjective",
    "TrainOptions",
    "TrainResult",
    "add_commands",
    "autocast_for",
    "train",
]
