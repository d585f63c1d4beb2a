"""What makes an output unique, and the UIDs derived from it.

A result's identity is its exact inputs plus the model (ARCHITECTURE.md, principles): the same
study processed again with the same model gives the same UIDs, so the TPS never holds two
versions of one object; anything else gives new UIDs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import synthesis

if TYPE_CHECKING:
    from synthesis import SynthesisResult

#: Entropy namespace of every UID planning derives (kept since the first release, so that
#: reprocessing a study after an upgrade rewrites the same objects).
NAMESPACE = "vcemri-planning"


def result_key(result: SynthesisResult) -> str:
    """What makes an output unique: the exact content of both inputs (instances, geometry,
    voxels; the T2w as placed on the T1w grid) and the exact model weights. A series that
    gained or changed an instance gives new UIDs: the TPS never receives other pixels under
    UIDs it already holds."""
    return "|".join((result.t1w.info.series_uid, result.t2w.info.series_uid,
                     result.t1w.digest(), result.t2w.digest(),
                     str(result.model.get("weights_sha256", "")),
                     str(result.model.get("architecture", "")),
                     f"align={result.alignment.mode}:{result.alignment.applied}"))


def output_uid(key: str, *parts: object) -> str:
    """The UID of an output (``parts`` name it: series, instance k, rtstruct...) of the result
    ``key`` identifies."""
    return synthesis.derived_uid(NAMESPACE, key, *parts)
