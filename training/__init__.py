"""Datasets from manifests, mixture modelling, the trainer (objectives, DDP, AMP), evaluation
tables, paired tests, figures and reports. Imports ``config``, ``synthesis`` and ``planning``
(evaluation scores exactly what the node delivers).

Commands: ``vcemri train``, ``vcemri evaluate``.
"""

from config import lazy_attributes

from .cli import add_commands, require_training_extra

# The trainer and evaluation import torch, SimpleITK and matplotlib; load them on first use
# so that `vcemri --help` and the other commands start fast.
_LAZY = {
    "TrainOptions": "trainer", "TrainResult": "trainer", "train": "trainer",
    "autocast_for": "trainer", "PairedObjective": "objectives", "CycleObjective": "objectives",
    "Evaluation": "evaluate", "evaluate_models": "evaluate", "write_evaluation": "evaluate",
    "design": "trainer", "read_manifest": "dataset", "BASELINE": "report",
    "paired_tests": "report", "tests_markdown": "report",
}
# (the submodule ``evaluate`` would shadow a public name ``evaluate``)
_RENAMED = {"write_evaluation": "write", "evaluate_models": "evaluate"}


__getattr__ = lazy_attributes(__name__, _LAZY, _RENAMED)


__all__ = [
    "BASELINE",
    "CycleObjective",
    "Evaluation",
    "PairedObjective",
    "TrainOptions",
    "TrainResult",
    "add_commands",
    "autocast_for",
    "design",
    "evaluate_models",
    "paired_tests",
    "read_manifest",
    "require_training_extra",
    "tests_markdown",
    "train",
    "write_evaluation",
]
