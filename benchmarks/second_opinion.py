"""Does a second model's confidence map flag the tumours a first model gets wrong? An analysis
for issue 14 of ``models.<name>.second_opinion``.

    python benchmarks/second_opinion.py MANIFEST MODEL SECOND [--institutions a,b]

Runs MODEL (a checkpoint, or ``builtin``) on every patient of MANIFEST (or of the given
institutions) through the node's synthesis (screening not enforced), alone and with SECOND as
its second opinion, whose confidence map joins MODEL's as the lower of the two per pixel: a
pixel is flagged where either model's error head expects its own VCE to be off by more than the
tolerance (the joined map is no longer calibrated to MODEL's error). Prints, per patient, on
the T1w's grid inside the head: the share of the CE-T1w's tumour excess contrast MODEL's VCE
keeps, the share of the tumour its low-confidence helper (c < 0.5) covers alone and combined,
the share of the head flagged, and Spearman's correlation between 1 - c and MODEL's |VCE - CE|
(30,000 head pixels drawn with a fixed seed); then, for the tumours MODEL gets wrong (excess
off by more than 30 %), how many each map covers at least half of. The issue's bars: every such
tumour half covered, Spearman >= 0.5.
"""

from __future__ import annotations

import argparse
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
from synthesis import read_volume, resample_onto
from training.dataset import read_manifest, tumour_mask
from training.reliability import excess_contrast

#: How far off the tumour's excess contrast may be before it counts as wrong (issue 14).
WRONG = 0.3
#: Head pixels drawn per patient for Spearman's correlation.
PIXELS = 30_000


def _checkpoint(name: str) -> str | None:
    return None if name == "builtin" else name


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
    print("patient | share kept | tumour covered alone / combined | head flagged alone / "
          "combined (%) | Spearman alone / combined")
    rows = []
    for entry in read_manifest(args.manifest):
        if (sites is not None and entry.institution not in sites) or "mask" not in entry.paths:
            continue
        t1, t2 = read_volume(entry.paths["t1w"]), read_volume(entry.paths["t2w"])
        ce = resample_onto(read_volume(entry.paths["ce"]), t1).array
        tumour = tumour_mask(entry.paths["mask"], t1.image)
        first = service.synthesize(t1, t2, checkpoint=_checkpoint(args.model), enforce=False)
        joined = service.synthesize(t1, t2, checkpoint=_checkpoint(args.model), enforce=False,
                                    second_opinion=args.second)
        head = sitk.GetArrayFromImage(first.foreground) > 0
        alone = sitk.GetArrayFromImage(first.confidence)
        combined = sitk.GetArrayFromImage(joined.confidence)
        truth = np.where(head, ce, 0)
        error = np.abs(first.vce.array - truth)
        kept = (excess_contrast(first.vce.array, tumour, head)
                / excess_contrast(truth, tumour, head))
        pick = np.random.default_rng(0).choice(np.flatnonzero(head), min(PIXELS, int(head.sum())),
                                               replace=False)
        row = {"patient": entry.patient, "kept": kept}
        for name, c in (("alone", alone), ("combined", combined)):
            row[f"tumour_{name}"] = float((c[tumour] < 0.5).mean())
            row[f"head_{name}"] = float((c[head] < 0.5).mean())
            row[f"rho_{name}"] = float(spearmanr(1 - c.ravel()[pick],
                                                 error.ravel()[pick]).statistic)
        rows.append(row)
        print(f"{entry.patient} | {kept:.2f} | {row['tumour_alone']:.2f} / "
              f"{row['tumour_combined']:.2f} | {100 * row['head_alone']:.1f} / "
              f"{100 * row['head_combined']:.1f} | {row['rho_alone']:.2f} / "
              f"{row['rho_combined']:.2f}", flush=True)
    if not rows:
        print("no patient with a tumour mask")
        return 1
    wrong = [r for r in rows if abs(r["kept"] - 1) > WRONG]
    for name in ("alone", "combined"):
        covered = sum(r[f"tumour_{name}"] >= 0.5 for r in wrong)
        print(f"{name}: {covered} of {len(wrong)} wrong tumours half covered; head flagged "
              f"median {100 * statistics.median(r[f'head_{name}'] for r in rows):.1f} %, "
              f"Spearman median {statistics.median(r[f'rho_{name}'] for r in rows):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
