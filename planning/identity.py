"""What makes an output unique, and the UIDs derived from it.

A result's identity is its exact inputs plus the model (ARCHITECTURE.md, principles): the same
study processed again with the same model gives the same UIDs, so the TPS never holds two
versions of one object; anything else gives new UIDs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import synthesis

if TYPE_CHECKING:
    from synthesis import SynthesisResult

#: Entropy namespace of every UID planning derives (kept since the first release, so that
#: reprocessing a study after an upgrade rewrites the same objects).
NAMESPACE = "vcemri-planning"


def result_key(result: SynthesisResult) -> str:
    """What makes an output unique: the exact content of its inputs (instances, geometry,
    voxels; each as placed on the T1w grid), the exact model weights and whether the T1w's
    detail was kept (``PipelineOptions.keep_t1w_detail``) and the second opinion's weights
    (``PipelineOptions.second_opinion``: another confidence map). A series that
    gained or changed an instance gives new UIDs: the TPS never receives other pixels under
    UIDs it already holds."""
    inputs = result.inputs or {"t1w": result.t1w, "t2w": result.t2w}
    others = [(role, v) for role, v in inputs.items() if role != "t1w" and v is not None]
    # a T1w + T2w result keys as it always has (same inputs, same UIDs as before)
    uids = [result.t1w.info.series_uid, *(v.info.series_uid for _, v in others)]
    digests = [result.t1w.digest(), *(v.digest() for _, v in others)]
    roles = [] if [r for r, _ in others] == ["t2w"] else ["inputs=" + "+".join(inputs)]
    # other pixels with the T1w's detail kept: other UIDs (without it, the key as before)
    detail = ["detail=t1w"] if result.model.get("keep_t1w_detail") else []
    # another confidence map (and so another helper RTSTRUCT) with a second opinion
    second = result.model.get("second_opinion")
    opinion = [f"second={second['weights_sha256']}"] if second else []
    return "|".join((*uids, *digests,
                     str(result.model.get("weights_sha256", "")),
                     str(result.model.get("architecture", "")),
                     f"align={result.alignment.mode}:{result.alignment.applied}", *roles,
                     *detail, *opinion))


def output_uid(key: str, *parts: object) -> str:
    """The UID of an output (``parts`` name it: series, instance k, rtstruct...) of the result
    ``key`` identifies."""
    return synthesis.derived_uid(NAMESPACE, key, *parts)


@dataclass(frozen=True)
class Supersedes:
    """An earlier synthetic series of the same T1w and T2w series, computed from other content
    (an instance added, resent with other bytes or missing) and already delivered: the new
    series says it replaces that one, so that a TPS user who holds both knows which to use."""

    #: the earlier synthetic series' Series Instance UID
    series_uid: str
    #: when the earlier series was written or delivered (local time, ``YYYY-MM-DD HH:MM``)
    when: str
    #: what changed in the input since, e.g. ``the T1w gained 2 instances``
    change: str

    def suffix(self) -> str:
        """What the SeriesDescription gains (a few words: it is 64 characters at most)."""
        return f" (supersedes {self.when})"

    def sentence(self) -> str:
        """What the DerivationDescription and comments gain."""
        return (f"Supersedes the synthetic series {self.series_uid} of {self.when}: "
                f"{self.change}.")


def described(base: str, supersedes: Supersedes | None, limit: int = 64) -> str:
    """A SeriesDescription (LO, ``limit`` characters) ending in the superseding note, the base
    shortened where both do not fit."""
    if supersedes is None:
        return base[:limit]
    suffix = supersedes.suffix()
    return base[:max(0, limit - len(suffix))].rstrip() + suffix
