"""What a series is (its role by the configured series rules) and finding a study's T1w and
T2w series in a folder: the same code for ``vcemri process`` and the node's spool."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import config

#: The roles a series can have; "other" is everything that is neither input nor target.
ROLES = ("t1w", "t2w", "contrast_enhanced", "other")


def series_role(rules: Any, header: Mapping[str, Any]) -> str:
    """The role of a series with this header (:meth:`SeriesInfo.header`) under the configured
    ``series_rules``: ``contrast_enhanced``, ``t1w``, ``t2w`` or ``other``.

    A series whose header says a contrast agent was given is contrast-enhanced whatever its
    description says, and the contrast-enhanced rule is tried first: an acquired
    post-contrast series is never a model input."""
    if header.get("Modality") != "MR":
        return "other"
    if str(header.get("ContrastBolusAgent") or "").strip() or \
            rules.contrast_enhanced.matches(header):
        return "contrast_enhanced"
    for role in ("t1w", "t2w"):
        if getattr(rules, role).matches(header):
            return role
    return "other"


def _describe(rule: config.SeriesRule) -> str:
    parts = []
    if rule.description:
        parts.append("SeriesDescription matching " + " or ".join(repr(p) for p in rule.description))
    if rule.exclude_description:
        parts.append("not matching " + ", ".join(repr(p) for p in rule.exclude_description))
    for label, bounds in (("TR", rule.repetition_time_ms), ("TE", rule.echo_time_ms),
                          ("TI", rule.inversion_time_ms)):
        if bounds is not None:
            parts.append(f"{label} in [{bounds.min}, {bounds.max}] ms")
    if rule.contrast_agent != "any":
        parts.append(f"contrast agent {rule.contrast_agent}")
    return "; ".join(parts)


def find_pair(folder: Path, rules: Any) -> tuple[list[Path], list[Path]]:
    """The files of the T1w and the T2w series in ``folder`` by the configured rules."""
    import pydicom

    from .series import scan_folder, series_info

    found: dict[str, list[tuple[str, list[Path]]]] = {"t1w": [], "t2w": []}
    for uid, files in scan_folder(folder).items():
        role = series_role(rules, series_info(
            pydicom.dcmread(files[0], stop_before_pixels=True)).header())
        if role in found:
            found[role].append((uid, files))
    names = {"t1w": "T1-weighted", "t2w": "T2-weighted"}
    for role, candidates in found.items():
        if not candidates:
            raise config.InputError(
                f"no {names[role]} series found (looked for: {_describe(getattr(rules, role))})",
                hint=f"check the series descriptions or series_rules.{role} in the configuration")
        if len(candidates) > 1:
            uids = ", ".join(uid for uid, _ in candidates)
            raise config.InputError(
                f"{len(candidates)} {names[role]} series match ({uids}); keep one in the folder "
                f"or tighten series_rules.{role}")
    return found["t1w"][0][1], found["t2w"][0][1]
