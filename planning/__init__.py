"""Everything written for the treatment planning system: the synthetic CE-MRI series, RTSTRUCT
helper contours and review images, and the service that runs a study from synthesis to those
objects (``SynthesisService``: the node, ``vcemri process`` and ``vcemri evaluate`` call it).
Imports ``config`` and ``synthesis``.
"""

from config import lazy_attributes

# SimpleITK, highdicom and PIL load on first use, so that `vcemri --help` stays fast.
_LAZY = {
    "Helper": "helpers", "helper_regions": "helpers", "PlanningOutputs": "write",
    "write_outputs": "write", "ProcessedStudy": "service", "SynthesisService": "service",
    "RTStructureSet": "rtstruct", "ROIInterpretedType": "rtstruct", "result_key": "identity",
    "Supersedes": "identity",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = list(_LAZY)
