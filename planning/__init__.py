"""Everything written for the treatment planning system: the synthetic CE-MRI series, RTSTRUCT
helper contours and review images. Imports ``config`` and ``synthesis`` types only.
"""

from .helpers import Helper, helper_regions
from .write import PlanningOutputs, write_outputs

__all__ = ["Helper", "PlanningOutputs", "helper_regions", "write_outputs"]
