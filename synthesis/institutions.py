"""Institution classification: is a study from one of the model's training institutions, and
if not, which training institution is closest (the reference for EDM, seed 000 FIG. 4)?

Header evidence is scored against each stored :class:`InstitutionProfile`: institution and
station names identify a site; manufacturer, model, field strength and TR/TE inside the site's
ranges support or contradict it. A study is *known* only with identifying evidence (a name)
and no contradiction. When headers are scrubbed or ambiguous, the patient's mean head
intensities (T1w, T2w) are compared with each site's distribution of patient means; intensity
alone picks the closest site but never declares a study known. Every decision lists its
evidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .checkpoint import InstitutionProfile
from .series import SeriesInfo

#: Score weights (points) for header evidence.
NAME, STATION, MAKER, MODEL, FIELD, FIELD_MISMATCH, SEQUENCE, SEQUENCE_MISMATCH = (
    4.0, 3.0, 1.5, 1.5, 1.0, -3.0, 0.5, -0.5)


@dataclass(frozen=True)
class InstitutionDecision:
    """The outcome: ``known`` and ``institution`` (a training site) or external with the
    ``closest`` training site, a ``confidence`` in [0, 1], and the ``evidence``."""

    known: bool
    institution: str | None
    closest: str | None
    confidence: float
    evidence: list[str] = field(default_factory=list)
    method: str = "headers"

    def as_dict(self) -> dict[str, object]:
        return {"known": self.known, "institution": self.institution, "closest": self.closest,
                "confidence": round(self.confidence, 3), "method": self.method,
                "evidence": list(self.evidence)}


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").split())


def _maker(text: str) -> str:
    """Vendor names as headers spell them differently ('GE MEDICAL SYSTEMS', 'GE Healthcare')."""
    text = _norm(text)
    for vendor in ("siemens", "philips", "ge ", "canon", "toshiba", "hitachi", "uih", "united"):
        if text.startswith(vendor.strip()) or vendor.strip() in text.split():
            return {"toshiba": "canon", "united": "uih"}.get(vendor.strip(), vendor.strip())
    return text


def _in(value: float | None, bounds: tuple[float, float] | None, slack: float = 0.1) -> bool | None:
    if value is None or bounds is None:
        return None
    low, high = bounds
    return low * (1 - slack) <= value <= high * (1 + slack)


def _header_score(profile: InstitutionProfile, t1w: SeriesInfo,
                  t2w: SeriesInfo | None) -> tuple[float, bool, list[str]]:
    score, identified, evidence = 0.0, False, []
    name = _norm(t1w.institution_name)
    if name and name in {_norm(n) for n in profile.institution_names}:
        score += NAME
        identified = True
        evidence.append(f"InstitutionName matches {profile.key}")
    station = _norm(t1w.station_name)
    if station and station in {_norm(n) for n in profile.station_names}:
        score += STATION
        identified = True
        evidence.append(f"StationName matches {profile.key}")
    if t1w.manufacturer and profile.manufacturer:
        if _maker(t1w.manufacturer) == _maker(profile.manufacturer):
            score += MAKER
            evidence.append(f"manufacturer {t1w.manufacturer} as {profile.key}")
        else:
            score -= MAKER
    if t1w.model and profile.model and _norm(t1w.model) == _norm(profile.model):
        score += MODEL
        evidence.append(f"model {t1w.model} as {profile.key}")
    if t1w.field_strength_t and profile.field_strength_t:
        if abs(t1w.field_strength_t - profile.field_strength_t) < 0.2:
            score += FIELD
            evidence.append(f"{t1w.field_strength_t:g} T as {profile.key}")
        else:
            score += FIELD_MISMATCH
            evidence.append(f"{t1w.field_strength_t:g} T, but {profile.key} is "
                            f"{profile.field_strength_t:g} T")
    for role, info in (("t1w", t1w), ("t2w", t2w)):
        ranges = profile.sequences.get(role)
        if ranges is None or info is None:
            continue
        for label, value, bounds in (("TR", info.repetition_time_ms, ranges.repetition_time_ms),
                                     ("TE", info.echo_time_ms, ranges.echo_time_ms)):
            inside = _in(value, bounds)
            if inside is True:
                score += SEQUENCE
            elif inside is False:
                score += SEQUENCE_MISMATCH
                evidence.append(f"{role} {label} {value:g} ms outside {profile.key}'s "
                                f"{bounds[0]:g}-{bounds[1]:g} ms")  # type: ignore[index]
    return score, identified, evidence


def _intensity_distance(profile: InstitutionProfile, means: dict[str, float]) -> float | None:
    """Squared z-distance of log patient means from the site's (None without statistics)."""
    total, used = 0.0, 0
    for role, mean in means.items():
        mu = profile.patient_mean.get(role)
        if not mu or mean <= 0:
            continue
        spread = profile.patient_mean_std.get(role, 0.15 * mu) / mu  # relative spread
        total += (math.log(mean / mu) / max(spread, 0.05)) ** 2
        used += 1
    return total / used if used else None


def classify(t1w: SeriesInfo, t2w: SeriesInfo | None, means: dict[str, float],
             profiles: Sequence[InstitutionProfile]) -> InstitutionDecision:
    """Decide where a study comes from (see the module docstring); a study without a T2w
    is judged on its T1w alone."""
    if not profiles:
        return InstitutionDecision(False, None, None, 0.0,
                                   ["the model stores no institution profiles"], "none")
    scored = []
    for profile in profiles:
        score, identified, evidence = _header_score(profile, t1w, t2w)
        distance = _intensity_distance(profile, means)
        scored.append((score, identified, evidence, distance, profile.key))
    scored.sort(key=lambda s: (-s[0], s[3] if s[3] is not None else math.inf))
    best = scored[0]
    runner_up = scored[1][0] if len(scored) > 1 else best[0] - 10.0
    margin = best[0] - runner_up
    field_conflict = any(" but " in e for e in best[2])
    protocol_differs = any("outside" in e for e in best[2])
    if best[1] and margin > 0 and not field_conflict:
        confidence = 1.0 / (1.0 + math.exp(-margin))
        note = ["(some protocol parameters differ from training)"] if protocol_differs else []
        return InstitutionDecision(True, best[4], best[4], confidence, best[2] + note)
    headers_informative = best[0] > 0 and margin > 0
    if headers_informative:
        return InstitutionDecision(
            False, None, best[4], 1.0 / (1.0 + math.exp(-margin)),
            ["no identifying institution or station name; closest by scanner and protocol: "
             + best[4], *best[2]])
    by_intensity = [s for s in scored if s[3] is not None]
    if by_intensity:
        by_intensity.sort(key=lambda s: s[3] if s[3] is not None else math.inf)
        distance = float(by_intensity[0][3] or 0.0)
        confidence = math.exp(-0.5 * distance)
        return InstitutionDecision(
            False, None, by_intensity[0][4], confidence,
            ["headers are scrubbed or ambiguous; closest by mean T1w/T2w intensity: "
             f"{by_intensity[0][4]} (z^2 = {distance:.2f})"], "intensity")
    return InstitutionDecision(False, None, best[4], 0.0,
                               ["no header or intensity evidence; first profile used"], "none")
