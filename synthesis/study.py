"""What a series is (its role by the configured series rules) and finding a study's T1w and
T2w series in a folder: the same code for ``vcemri process`` and the node's spool."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import config

#: The roles a series can have; "other" is everything that is neither input nor target.
#: ``t2w_fs`` (fat-suppressed T2w), ``stir``, ``dwi`` (its highest b-value) and ``adc`` are
#: inputs for models trained with them; a model's T2w input takes a plain T2w, else a
#: fat-suppressed one, else a STIR (:data:`STANDS_IN`), as training sites mix them.
ROLES = ("t1w", "t2w", "t2w_fs", "stir", "dwi", "adc", "contrast_enhanced", "other")

#: The series roles that can fill a model input, in order of preference.
STANDS_IN: dict[str, tuple[str, ...]] = {
    "t1w": ("t1w",), "t2w": ("t2w", "t2w_fs", "stir"), "t2w_fs": ("t2w_fs",),
    "stir": ("stir",), "dwi": ("dwi",), "adc": ("adc",)}

#: Names people use for each role, in messages.
ROLE_NAMES = {"t1w": "T1-weighted", "t2w": "T2-weighted", "t2w_fs": "fat-suppressed T2-weighted",
              "stir": "STIR", "dwi": "diffusion-weighted (DWI)",
              "adc": "ADC map", "contrast_enhanced": "contrast-enhanced T1-weighted"}

#: Short names of model inputs in descriptions, captions and labels.
INPUT_NAMES = {"t1w": "T1w", "t2w": "T2w", "t2w_fs": "T2w FS", "stir": "STIR", "dwi": "DWI",
               "adc": "ADC"}

#: The order rules are tried after contrast-enhanced: the specific before the general (a
#: "t2_tse_fs" is a fat-suppressed T2w before it is a T2w; a DWI is no T1w or T2w).
_RULE_ORDER = ("adc", "dwi", "stir", "t2w_fs", "t1w", "t2w")


def series_role(rules: Any, header: Mapping[str, Any]) -> str:
    """The role of a series with this header (:meth:`SeriesInfo.header`) under the configured
    ``series_rules``: one of :data:`ROLES`.

    A series whose header says a contrast agent was given is contrast-enhanced whatever its
    description says, and the contrast-enhanced rule is tried first: an acquired
    post-contrast series is never a model input. The header decides diffusion too: ImageType
    ADC is an ADC map, a DiffusionBValue above 0 a DWI; then the rules of
    :data:`_RULE_ORDER`, and a T2w with fat saturation in ScanOptions is ``t2w_fs``."""
    if header.get("Modality") != "MR":
        return "other"
    if str(header.get("ContrastBolusAgent") or "").strip() or \
            rules.contrast_enhanced.matches(header):
        return "contrast_enhanced"
    image_type = [str(v).upper() for v in header.get("ImageType") or []]
    if "ADC" in image_type:
        return "adc"
    b_value = header.get("DiffusionBValue")
    if isinstance(b_value, (int, float)) and b_value > 0:
        return "dwi"
    for role in _RULE_ORDER:
        rule = getattr(rules, role, None)
        if rule is not None and rule.matches(header):
            if role == "t2w" and "FS" in [str(v).upper() for v in
                                          header.get("ScanOptions") or []]:
                return "t2w_fs"
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


def find_inputs(folder: Path, rules: Any, inputs: Sequence[str],
                required: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """The files of the series in ``folder`` that fill each of a model's ``inputs`` (by the
    configured rules and :data:`STANDS_IN`); every one of ``required`` (default: all) must be
    there, the others are used when present. Two series competing for one input are refused:
    which one the user meant cannot be guessed."""
    import pydicom

    from .series import scan_folder, series_info

    required = tuple(inputs if required is None else required)
    by_role: dict[str, list[tuple[str, list[Path]]]] = {}
    for uid, files in scan_folder(folder).items():
        role = series_role(rules, series_info(
            pydicom.dcmread(files[0], stop_before_pixels=True)).header())
        by_role.setdefault(role, []).append((uid, files))
    found: dict[str, list[Path]] = {}
    for wanted in inputs:
        for role in STANDS_IN.get(wanted, (wanted,)):
            candidates = by_role.get(role, [])
            if len(candidates) > 1:
                uids = ", ".join(uid for uid, _ in candidates)
                raise config.InputError(
                    f"{len(candidates)} {ROLE_NAMES.get(role, role)} series match ({uids}); "
                    f"keep one in the folder or tighten series_rules.{role}")
            if candidates:
                found[wanted] = candidates[0][1]
                break
        else:
            if wanted in required:
                looked = "; ".join(_describe(getattr(rules, r)) for r in
                                   STANDS_IN.get(wanted, (wanted,)) if hasattr(rules, r))
                raise config.InputError(
                    f"no {ROLE_NAMES.get(wanted, wanted)} series found (looked for: {looked})",
                    hint=f"check the series descriptions or series_rules.{wanted} in the "
                         "configuration")
    return found


def find_pair(folder: Path, rules: Any) -> tuple[list[Path], list[Path]]:
    """The files of the T1w and the T2w series in ``folder`` by the configured rules."""
    found = find_inputs(folder, rules, ("t1w", "t2w"))
    return found["t1w"], found["t2w"]
