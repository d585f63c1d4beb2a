"""Simulated multi-institution head-and-neck MR cohorts: the phantom, tissues, MR physics, the
acquisition (and, opt-in, diffusion-weighted imaging: simulation/diffusion.py), the site
catalogue, DICOM export (through ``synthesis``'s writer), the preview and ``vcemri simulate``.
Imports ``config`` and ``synthesis``.

The demo, the tests, the benchmarks and whoever trains without patient data use it; training
itself needs manifests, not phantoms.
"""

from config import lazy_attributes

from .cli import add_commands
from .sites import SITES, PulseSequence, Site

# The export imports highdicom and SimpleITK; load it on first use so that `vcemri --help`
# and the other commands start fast.
_LAZY = {
    "COHORT": "cohort", "MANIFEST": "cohort", "SimulationOptions": "cohort",
    "check_output_directory": "cohort", "simulate_cohort": "cohort",
    "simulate_patient": "cohort", "PatientRecord": "record", "default_slices": "acquisition",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "COHORT",
    "MANIFEST",
    "SITES",
    "PatientRecord",
    "PulseSequence",
    "SimulationOptions",
    "Site",
    "add_commands",
    "check_output_directory",
    "default_slices",
    "simulate_cohort",
    "simulate_patient",
]
