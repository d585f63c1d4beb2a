"""Does a second model's confidence map flag the tumours a first model gets wrong? An analysis
for issue 14 of ``models.<name>.second_opinion``.

    python benchmarks/second_opinion.py MANIFEST MODEL SECOND [--institutions a,b]

Runs MODEL (a checkpoint, ``builtin`` or ``builtin:NAME``) on every patient of MANIFEST (or
of the given institutions) through the node's synthesis (screening not enforced) with SECOND as
its second opinion, whose confidence map joins MODEL's as the lower of the two per pixel: a
pixel is flagged where either model's error head expects its own VCE to be off by more than the
tolerance (the joined map is no longer calibrated to MODEL's error). The result keeps each
model's own map too (``SynthesisResult.opinions``), so one run per patient gives all three.
Prints, per patient, on the T1w's grid inside the head: whether screening accepts the study,
the share of the CE-T1w's tumour excess contrast MODEL's VCE keeps, the share of the tumour its
low-confidence helper (c < 0.5) covers alone and combined, the share of the head flagged, and
Spearman's correlation between 1 - c and MODEL's |VCE - CE| (30,000 head pixels drawn with a
fixed seed); then, for the tumours MODEL gets wrong (excess off by more than 30 %), how many
each map covers at least half of, how many it does not in a study screening accepts (the
failure the issue is about: an accepted study with a wrong tumour nothing flags), and the
median Spearman, overall and per institution (and, for a randomised-protocol cohort, the share
kept per T1w sequence family: issue 15's bar is >= 0.7). Issue 14's bars: every such tumour
half covered, Spearman >= 0.5 per external site. Last, the same summary for other ways of joining
the two maps, computed here from each model's own map (not what the node does): the sum of the
two error estimates (c = T / (T + e1 + e2), with e = T (1 - c) / c the estimate behind a
confidence c) and their mean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import SimpleITK as sitk
from scipy.stats import spearmanr

from benchmarks.machine import describe
from config import Settings
from planning import SynthesisService
from synthesis import read_volume, resample_onto, stated_error
from synthesis.inference import confidence_of
from training.dataset import read_manifest, tumour_mask
from training.reliability import excess_contrast

#: How far off the tumour's excess contrast may be before it counts as wrong (issue 14).
WRONG = 0.3
#: Head pixels drawn per patient for Spearman's correlation.
PIXELS = 30_000


#: Other ways to join the model's map (a) and the second model's own (b), for comparison.
RULES = {
    "sum of estimates": lambda a, b: confidence_of(stated_error(a) + stated_error(b)),
    "mean of estimates": lambda a, b: confidence_of((stated_error(a) + stated_error(b)) / 2),
}


def _checkpoint(name: str) -> str | None:
    return None if name == "builtin" else name  # the service's default model


def _median(rows: list[dict], key: str, site: str | None = None) -> float:
    return statistics.median(r[key] for r in rows if site is None or r["site"] == site)


def _t1w_families(manifest: Path) -> dict[str, str]:
    """Patient -> the T1w sequence family it drew, for a randomised-protocol cohort
    (``vcemri simulate --randomize``: its cohort.json beside the manifest); empty otherwise."""
    cohort = manifest.parent / "cohort.json"
    if not cohort.is_file():
        return {}
    return {p["patient"]: p["randomized"]["families"]["t1w"]
            for p in json.loads(cohort.read_text())["patients"] if p.get("randomized")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("model")
    parser.add_argument("second")
    parser.add_argument("--institutions", default=None,
                        help="comma-separated institutions (default: every patient)")
    args = parser.parse_args()
    sites = set(args.institutions.split(",")) if args.institutions else None
    service = SynthesisService(Settings())
    print(describe())
    print("patient | screening | share kept | tumour covered alone / combined | head flagged "
          "alone / combined (%) | Spearman alone / combined")
    rows = []
    for entry in read_manifest(args.manifest):
        if (sites is not None and entry.institution not in sites) or "mask" not in entry.paths:
            continue
        t1, t2 = read_volume(entry.paths["t1w"]), read_volume(entry.paths["t2w"])
        ce = resample_onto(read_volume(entry.paths["ce"]), t1).array
        tumour = tumour_mask(entry.paths["mask"], t1.image)
        first = service.synthesize(t1, t2, checkpoint=_checkpoint(args.model), enforce=False,
                                   second_opinion=args.second)
        head = sitk.GetArrayFromImage(first.foreground) > 0
        alone, other = (sitk.GetArrayFromImage(first.opinions[key])
                        for key in ("model", "second_opinion"))
        maps = {"alone": alone, "combined": sitk.GetArrayFromImage(first.confidence),
                **{rule: join(alone, other) for rule, join in RULES.items()}}
        truth = np.where(head, ce, 0)
        error = np.abs(first.vce.array - truth)
        kept = (excess_contrast(first.vce.array, tumour, head)
                / excess_contrast(truth, tumour, head))
        pick = np.random.default_rng(0).choice(np.flatnonzero(head), min(PIXELS, int(head.sum())),
                                               replace=False)
        row = {"patient": entry.patient, "site": entry.institution, "kept": kept,
               "accepted": first.screening.accepted}
        for name, c in maps.items():
            row[f"tumour_{name}"] = float((c[tumour] < 0.5).mean())
            row[f"head_{name}"] = float((c[head] < 0.5).mean())
            row[f"rho_{name}"] = float(spearmanr(1 - c.ravel()[pick],
                                                 error.ravel()[pick]).statistic)
        rows.append(row)
        print(f"{entry.patient} | {'accepts' if row['accepted'] else 'refuses'} | "
              f"{kept:.2f} | {row['tumour_alone']:.2f} / "
              f"{row['tumour_combined']:.2f} | {100 * row['head_alone']:.1f} / "
              f"{100 * row['head_combined']:.1f} | {row['rho_alone']:.2f} / "
              f"{row['rho_combined']:.2f}", flush=True)
    if not rows:
        print("no patient with a tumour mask")
        return 1
    wrong = [r for r in rows if abs(r["kept"] - 1) > WRONG]
    for name in ("alone", "combined", *RULES):
        covered = sum(r[f"tumour_{name}"] >= 0.5 for r in wrong)
        missed = sum(r["accepted"] and r[f"tumour_{name}"] < 0.5 for r in wrong)
        print(f"{name}: {covered} of {len(wrong)} wrong tumours half covered ({missed} not, "
              f"in a study screening accepts); head flagged "
              f"median {100 * _median(rows, f'head_{name}'):.1f} %, "
              f"Spearman median {_median(rows, f'rho_{name}'):.2f} ("
              + ", ".join(f"{site} {_median(rows, f'rho_{name}', site):.2f}"
                          for site in sorted({r["site"] for r in rows})) + ")")
    families = _t1w_families(args.manifest)
    by_family: dict[str, list[float]] = {}
    for r in rows:
        if r["patient"] in families:
            by_family.setdefault(families[r["patient"]], []).append(r["kept"])
    if by_family:
        print("share kept, mean per patient, by T1w family: " + ", ".join(
            f"{family} {statistics.fmean(kept):.2f} ({len(kept)})"
            for family, kept in sorted(by_family.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
