"""Finding a study's T1w and T2w series in a folder by the configured series rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import config


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
        info = series_info(pydicom.dcmread(files[0], stop_before_pixels=True))
        if info.modality != "MR":
            continue
        for role in found:
            if getattr(rules, role).matches(info.header()):
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
