"""The verdict on every output, in words an oncologist reads: accepted; accepted with
low-confidence regions (how much of the head, and whether any touches the enhancement
helper, where a reader looks for tumour); or refused, with the reasons. A study screening
refused is processed only when an administrator forces it (``vcemri jobs retry --force``);
its objects then carry the refusal too.

The verdict goes into result.json, the job, ``vcemri jobs show``, the review image's caption,
the RTSTRUCT's description and every synthetic image's ImageComments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

if TYPE_CHECKING:
    from synthesis import Screening, SynthesisResult

    from .helpers import Helper

ACCEPTED = "accepted"
LOW_CONFIDENCE = "accepted with low-confidence regions"
REFUSED = "refused"


@dataclass(frozen=True)
class Verdict:
    """The verdict on one study's output (see the module docstring)."""

    state: str
    reasons: list[str] = field(default_factory=list)
    #: share of the head below the low-confidence threshold (percent), when there is a map
    low_confidence_head_percent: float | None = None
    #: whether a low-confidence region overlaps the enhancement helper
    touches_enhancement: bool | None = None
    #: screening refused the study and an administrator had it processed anyway
    forced: bool = False

    def line(self) -> str:
        """The verdict in one line (ImageComments, captions, logs)."""
        if self.state == REFUSED:
            head = ("REFUSED by screening, processed anyway at an administrator's request"
                    if self.forced else "REFUSED by screening")
            return f"{head}: {'; '.join(self.reasons)}"
        if self.state == LOW_CONFIDENCE:
            where = ("touching the enhancement helper" if self.touches_enhancement
                     else "not touching the enhancement helper")
            return (f"accepted with low-confidence regions: {self.low_confidence_head_percent:.1f}"
                    f" % of the head, {where}")
        return "accepted"

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "line": self.line()}


def refused(screening: Screening, forced: bool = False) -> Verdict:
    """The verdict on a study screening refused."""
    return Verdict(REFUSED, list(screening.reasons), forced=forced)


def verdict_of(result: SynthesisResult, helpers: list[Helper], suffix: str) -> Verdict:
    """The verdict on ``result`` given its helper regions; ``suffix`` names the helpers
    (``helper_prefix``: LowConfidence, Enhancement)."""
    if not result.screening.accepted:
        return refused(result.screening, forced=True)
    if result.confidence is None:
        return Verdict(ACCEPTED)
    by_name = {h.name: h.mask for h in helpers}
    low = by_name.get(f"{suffix}LowConfidence")
    head = (sitk.GetArrayFromImage(result.foreground) > 0 if result.foreground is not None
            else np.ones(result.vce.shape, bool))
    if low is None or not low.any():
        return Verdict(ACCEPTED, low_confidence_head_percent=0.0, touches_enhancement=False)
    enhancement = by_name.get(f"{suffix}Enhancement")
    percent = 100.0 * float((low & head).sum()) / max(float(head.sum()), 1.0)
    touches = bool(enhancement is not None and (low & enhancement).any())
    return Verdict(LOW_CONFIDENCE, low_confidence_head_percent=round(percent, 2),
                   touches_enhancement=touches)
