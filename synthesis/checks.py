"""Input checks that need no model: is this a T1w and a T2w of one head-and-neck study that a
model trained on these acquisitions can work with? Each check returns the reasons it refuses,
one line each, with the measured value and the bound.

Thresholds were set on the simulator's seven fixed sites (two patients each, where the
normal values lie, ``benchmarks/screening.py`` prints them) with wide margins, so that no
acquisition the simulator can play is refused:

- contrast: the T2w's brightest voxels (fluid) are dark on a true T1w, and the T1w's
  brightest voxels (fat, marrow) are not darker on a true T2w than the fluid is on the T1w.
  Median T1w at the T2w's top 3 %, relative to the T1w's head median: 0.43-0.80 on the
  fixed sites and randomised SE, TSE and GRE, 0.24-1.15 on randomised T1-FLAIR (more where
  its inversion nulls most of the brain: 1.47 with a fat-suppressed T2w). Median T2w at the
  T1w's top 3 % relative to the T2w's median: 1.3-2.2 (FSE), 0.32-0.94 (STIR), 0.15-0.27
  (fat-suppressed TSE). A swapped pair with an FSE T2w reverses the two (1.34-2.2 and
  0.49-0.80): refused when the first is above 1.25, the second lies where fluid on a T1w
  does (0.35-0.85, not suppressed fat's darker) and the first exceeds the second by 20 %.
  With a STIR or fat-suppressed T2w both series darken the other's brightest voxels and a
  swap reads like a real pair (inst1's swapped STIR pair 0.77 and 0.54; a real T1-FLAIR and
  STIR pair 0.73 and 0.70, another 1.15 and 0.61; relative to each series' own brightest
  voxels the two overlap too), so this check cannot tell and the fitness classifier
  judges; nor can it when the slab holds no fluid (e.g. 40 mm around the nasopharynx, or a
  randomised slab whose brightest T2w voxels are fat: 2.9 and 2.1). Measured on 21
  fixed-site patients (3 per site), 12 randomised ones (SE or TSE T1w, TSE or STIR T2w) and
  28 with families no model trains on (T1-FLAIR or 2D GRE T1w, fat-suppressed TSE or STIR
  T2w);
- the same content twice: correlation of the two series inside the head, -0.12-0.71 for
  real pairs; refused above 0.97;
- noise only: correlation of neighbouring voxels inside the head, 0.90-0.94 for anatomy, 0
  for noise; refused below 0.5; empty: no intensity variation at all;
- ghosting: signal outside the (dilated) head that is both strong and structured: its mean
  relative to the head's, 0.026-0.055 for Rician background noise, and the correlation of
  neighbouring background voxels, -0.01-0.12 for noise, 0.83-0.98 once a ghost of 15 % of
  the head's signal lies there; refused above 0.06 and 0.5 together;
- extreme intensity non-uniformity: a head is nearly symmetric left to right, so the mean
  intensities of its left and right halves (median over slices of the larger over the
  smaller) are 1.01-1.07; a coil field rising 6-fold across the field of view gives
  1.44-1.87; refused above 1.4 (non-uniformity front to back or head to foot is not judged:
  the anatomy differs there);
- not a head: the widest axial cross-section of the head mask, 137-210 mm; refused above
  260 mm (a torso or pelvis);
- misregistration: the in-plane distance between the centroids of the T1w's and the T2w's
  head masks (median over the slices where both have one); beyond the plausible bound of
  registration (synthesis.alignment.MAX_PLAUSIBLE_MM, 15 mm) the pair is refused;
- header and content: TR/TE/TI that say the other weighting (T2-weighted: TE >= 60 ms, or
  TE >= 45 ms with TR >= 2000 ms, or an inversion recovery with TI 80-300 ms, STIR;
  T1-weighted: spin echo with TR <= 1200 ms and TE <= 30 ms, or a gradient echo with
  TR < 100 ms and TE < 15 ms);
- geometry the model never saw: slice spacing and in-plane pixel spacing more than a factor
  of two outside the ranges of its training T1w series (stored in the checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from .alignment import MAX_PLAUSIBLE_MM
from .checkpoint import AcquisitionRanges
from .series import SeriesInfo

#: Fraction of the brightest head voxels whose intensity on the other series is compared.
TOP_FRACTION = 0.03
#: Relative to the other series' median, brightest voxels darker than this show fluid (or
#: suppressed fat); without such evidence the contrast check is inconclusive.
FLUID_EVIDENCE = 0.85
#: How much the swap evidence must exceed the normal ordering to refuse.
SWAP_MARGIN = 1.2
#: Relative to the T1w's median, a true T1w is darker than this where the T2w is brightest
#: (fluid: 0.24-0.80, up to 1.15 under a T1-FLAIR whose inversion nulls the brain; a swapped
#: FSE pair reads 1.34-2.2).
FLUID_ON_T1W_MAX = 1.25
#: Relative to the T2w's median, the T1w's brightest voxels darker than this on the T2w are
#: suppressed fat (0.15-0.34 measured), not the fluid-on-a-T1w of a swapped pair (0.40-0.80).
SUPPRESSED_FAT = 0.35
#: Correlation inside the head above which two series hold the same images.
SAME_CONTENT_CORRELATION = 0.97
#: Neighbour correlation inside the head below which a series is noise.
NOISE_NEIGHBOUR_CORRELATION = 0.5
#: Mean outside / mean inside the head, and neighbour correlation outside the head, above
#: which a series has ghosts (or worse): structured signal where only noise should be.
GHOST_RATIO = 0.06
GHOST_NEIGHBOUR_CORRELATION = 0.5
#: Larger over smaller mean intensity of the head's left and right halves above which the
#: coil's non-uniformity is extreme.
LEFT_RIGHT_RATIO = 1.4
#: Widest axial cross-section of a head and neck (mm); wider is another body part.
MAX_HEAD_WIDTH_MM = 260.0
#: How far outside the training ranges slice thickness and pixel spacing may lie (factor).
GEOMETRY_FACTOR = 2.0

NAMES = {"t1w": "T1w", "t2w": "T2w", "t2w_fs": "fat-suppressed T2w", "stir": "STIR",
         "dwi": "DWI", "adc": "ADC map"}


def _median_at(values: np.ndarray, where: np.ndarray, head: np.ndarray) -> float:
    reference = float(np.median(values[head]))
    return float(np.median(values[where])) / reference if reference > 0 else float("nan")


def contrast(t1w: np.ndarray, t2w: np.ndarray, head: np.ndarray) -> tuple[list[str], dict]:
    """Whether the T1w looks T1-weighted and the T2w T2-weighted (the tissue ordering in the
    module docstring); the two ratios are returned as evidence."""
    if head.sum() < 100:
        return [], {}
    bright_t2 = head & (t2w >= np.quantile(t2w[head], 1 - TOP_FRACTION))
    bright_t1 = head & (t1w >= np.quantile(t1w[head], 1 - TOP_FRACTION))
    fluid_on_t1 = _median_at(t1w, bright_t2, head)
    fat_on_t2 = _median_at(t2w, bright_t1, head)
    evidence = {"t1w_at_t2w_brightest": round(fluid_on_t1, 3),
                "t2w_at_t1w_brightest": round(fat_on_t2, 3)}
    # conclusive only for the one reading a real pair cannot give: fluid (the T2w's
    # brightest) bright on the "T1w" while fat (the T1w's brightest) shows fluid's darkness
    # on the "T2w"; suppressed fat darkens a real T2w further still
    conclusive = SUPPRESSED_FAT <= fat_on_t2 < FLUID_EVIDENCE
    evidence["conclusive"] = bool(conclusive)
    if conclusive and fluid_on_t1 > max(FLUID_ON_T1W_MAX, SWAP_MARGIN * fat_on_t2):
        return [f"the series look swapped: the T2w's brightest voxels (fluid on a T2w) are "
                f"{fluid_on_t1:.2f} x the T1w's median on the T1w, brighter than the T1w's "
                f"brightest voxels are on the T2w ({fat_on_t2:.2f} x); check which series is "
                "T1-weighted"], evidence
    return [], evidence


def same_content(t1w: np.ndarray, t2w: np.ndarray, head: np.ndarray) -> list[str]:
    """Two series that hold the same images (one copied into the other's place)."""
    a, b = t1w[head], t2w[head]
    if a.size < 100 or a.std() == 0 or b.std() == 0:
        return []
    correlation = float(np.corrcoef(a, b)[0, 1])
    if correlation > SAME_CONTENT_CORRELATION:
        return [f"the T1w and T2w hold the same images (correlation {correlation:.3f} inside "
                f"the head, above {SAME_CONTENT_CORRELATION}): one series was copied into the "
                "other's place"]
    return []


def _neighbour_correlation(volume: np.ndarray, head: np.ndarray) -> float:
    both = head[:, :-1, :] & head[:, 1:, :]
    a, b = volume[:, :-1, :][both], volume[:, 1:, :][both]
    if a.size < 100 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def signal(role: str, volume: np.ndarray, head: np.ndarray) -> list[str]:
    """An empty series, or one of noise only."""
    name = NAMES[role]
    if not np.isfinite(volume).all() or float(volume.max() - volume.min()) == 0:
        return [f"the {name} is empty (no intensity variation)"]
    correlation = _neighbour_correlation(volume, head)
    if correlation < NOISE_NEIGHBOUR_CORRELATION:
        return [f"the {name} holds noise, not anatomy (neighbouring voxels correlate "
                f"{correlation:.2f}, anatomy > {NOISE_NEIGHBOUR_CORRELATION})"]
    return []


def artefacts(role: str, volume: np.ndarray, head: np.ndarray,
              spacing_mm: tuple[float, float]) -> list[str]:
    """Ghosting (signal outside the head) and extreme intensity non-uniformity.
    ``spacing_mm``: (between rows, between columns)."""
    name, reasons = NAMES[role], []
    inside = float(volume[head].mean()) if head.any() else 0.0
    outside_mask = ~ndimage.binary_dilation(head, iterations=3)
    if inside > 0 and outside_mask.any():
        ratio = float(volume[outside_mask].mean()) / inside
        structure = _neighbour_correlation(volume, outside_mask)
        if ratio > GHOST_RATIO and structure > GHOST_NEIGHBOUR_CORRELATION:
            reasons.append(f"the {name} has structured signal outside the head ({ratio:.2f} x "
                           f"the head's mean, neighbouring voxels correlating {structure:.2f}; "
                           f"background noise is below {GHOST_RATIO} and "
                           f"{GHOST_NEIGHBOUR_CORRELATION}): ghosting or another severe "
                           "artefact")
    asymmetry = _left_right(volume, head)
    if asymmetry > LEFT_RIGHT_RATIO:
        reasons.append(f"the {name}'s left and right halves differ {asymmetry:.2f}-fold in mean "
                       f"intensity (a head is nearly symmetric; at most {LEFT_RIGHT_RATIO}): "
                       "extreme coil non-uniformity")
    return reasons


def _left_right(volume: np.ndarray, head: np.ndarray) -> float:
    """Median over slices of the larger over the smaller mean intensity of the head's two
    halves, split at its centroid column."""
    ratios = []
    columns = np.arange(head.shape[2])[None, :]
    for k in range(len(volume)):
        if head[k].sum() < 200:
            continue
        centre = ndimage.center_of_mass(head[k])[1]
        halves = [volume[k][head[k] & side] for side in (columns < centre, columns >= centre)]
        means = [float(h.mean()) if h.size else 0.0 for h in halves]
        if min(means) > 0:
            ratios.append(max(means) / min(means))
    return float(np.median(ratios)) if ratios else 1.0


def body(head: np.ndarray, spacing_mm: tuple[float, float]) -> list[str]:
    """Anatomy too wide for a head and neck. ``spacing_mm``: (between rows, columns)."""
    if not head.any():
        return []
    width = max(float(head[k].any(0).sum()) * spacing_mm[1] for k in range(len(head)))
    depth = max(float(head[k].any(1).sum()) * spacing_mm[0] for k in range(len(head)))
    widest = max(width, depth)
    if widest > MAX_HEAD_WIDTH_MM:
        return [f"the imaged body is {widest:.0f} mm across (a head and neck is at most "
                f"{MAX_HEAD_WIDTH_MM:.0f} mm): not a head-and-neck study"]
    return []


def misregistration(heads: Mapping[str, np.ndarray], spacing_mm: tuple[float, float]
                    ) -> list[str]:
    """T1w and T2w whose heads lie apart in plane further than registration may correct.
    ``heads``: each series' head mask on the T1w grid; ``spacing_mm``: (rows, columns)."""
    offsets = []
    for k in range(len(heads["t1w"])):
        a, b = heads["t1w"][k], heads["t2w"][k]
        if a.sum() < 50 or b.sum() < 50:
            continue
        delta = (np.array(ndimage.center_of_mass(a)) - np.array(ndimage.center_of_mass(b)))
        offsets.append(float(np.hypot(delta[0] * spacing_mm[0], delta[1] * spacing_mm[1])))
    if not offsets:
        return []
    distance = float(np.median(offsets))
    if distance > MAX_PLAUSIBLE_MM:
        return [f"the T1w and T2w are misregistered: their heads lie {distance:.0f} mm apart "
                f"in plane (registration corrects at most {MAX_PLAUSIBLE_MM:.0f} mm)"]
    return []


def header_weighting(info: SeriesInfo) -> str | None:
    """'T1' or 'T2' when the series' TR/TE/TI say so (see the module docstring), else None."""
    tr, te, ti = info.repetition_time_ms, info.echo_time_ms, info.inversion_time_ms
    if te is not None and (te >= 60 or (te >= 45 and tr is not None and tr >= 2000)):
        return "T2"
    if ti is not None and 80 <= ti <= 300 and (tr is None or tr > 1500):
        return "T2"  # STIR: fluid bright, fat suppressed
    gradient = "GR" in "".join(info.scanning_sequence).upper() if info.scanning_sequence else False
    if tr is not None and te is not None:
        if gradient and tr < 100 and te < 15:
            return "T1"
        if not gradient and tr <= 1200 and te <= 30 and ti is None:
            return "T1"
    return None


def header(t1w: SeriesInfo, t2w: SeriesInfo | None) -> list[str]:
    """A series whose own TR/TE/TI say the other weighting than its role (the T1w alone
    when a model is given no T2w)."""
    reasons = []
    for role, info, wrong in (("t1w", t1w, "T2"), ("t2w", t2w, "T1")):
        if info is not None and header_weighting(info) == wrong:
            timing = ", ".join(f"{label} {value:g} ms" for label, value in (
                ("TR", info.repetition_time_ms), ("TE", info.echo_time_ms),
                ("TI", info.inversion_time_ms)) if value is not None)
            described = info.description or "no description"
            reasons.append(f"the series used as {NAMES[role]} ({described}) has {timing}: a "
                           f"{wrong}-weighted protocol")
    return reasons


def geometry(slice_spacing_mm: float, pixel_spacing_mm: float,
             ranges: AcquisitionRanges) -> list[str]:
    """Slice spacing and (the finer) in-plane pixel spacing more than
    :data:`GEOMETRY_FACTOR` outside the training ranges."""
    reasons = []
    for label, value, bounds in (("slice spacing", slice_spacing_mm, ranges.slice_spacing_mm),
                                 ("in-plane pixel spacing", pixel_spacing_mm,
                                  ranges.pixel_spacing_mm)):
        if value is None or bounds is None:
            continue
        low, high = bounds[0] / GEOMETRY_FACTOR, bounds[1] * GEOMETRY_FACTOR
        if not low <= value <= high:
            reasons.append(f"{label} {value:.2f} mm is far outside what the model was trained "
                           f"on ({bounds[0]:.2f}-{bounds[1]:.2f} mm; accepted "
                           f"{low:.2f}-{high:.2f} mm)")
    return reasons


def content_checks(arrays: Mapping[str, np.ndarray], head: np.ndarray,
                   spacing_mm: tuple[float, float],
                   heads: Mapping[str, np.ndarray] | None = None) -> tuple[list[str], dict]:
    """Every content check on a study's inputs on one grid ((slices, rows, columns), scanner
    units) with the T1w's head mask (and, for the misregistration check, each series' own
    head mask in ``heads``); returns the reasons and the contrast evidence. The checks that
    compare two series (same content, contrast ordering, misregistration) need the T1w and
    the T2w; every input is checked for signal; DWI and ADC, low-resolution EPI whose
    distortion moves the head, are not checked for signal outside the T1w's head."""
    reasons: list[str] = []
    for role in arrays:
        reasons += signal(role, arrays[role], head)
    if reasons:  # noise or nothing: the other checks would only repeat it
        return reasons, {}
    pair = "t1w" in arrays and "t2w" in arrays
    evidence: dict = {}
    if pair:
        reasons += same_content(arrays["t1w"], arrays["t2w"], head)
        found, evidence = contrast(arrays["t1w"], arrays["t2w"], head) if not reasons \
            else ([], {})
        reasons += found
    anatomical = [r for r in ("t1w", "t2w") if r in arrays]
    # each series' artefacts outside the head both show: a ghost enlarges its own series' mask
    shared = head
    if heads is not None:
        for role in anatomical:
            shared = shared & heads[role]
    for role in anatomical:
        reasons += artefacts(role, arrays[role], shared, spacing_mm)
    reasons += body(head, spacing_mm)
    if heads is not None and pair:
        reasons += misregistration(heads, spacing_mm)
    return reasons, evidence
