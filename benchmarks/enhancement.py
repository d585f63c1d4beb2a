"""How much of the tumour's enhancement each method keeps, from a `vcemri evaluate` run: per
institution, or, for a randomised-protocol cohort (`vcemri simulate --randomize`), per sequence
family the patients drew.

    python benchmarks/enhancement.py EVALUATION_DIR COHORT_DIR [--by institution|t1w|t2w|ce]

Reads EVALUATION_DIR/evaluation.csv and COHORT_DIR/cohort.json (the families drawn) and prints,
per group and method: patients, mean tumour excess contrast (mean tumour / mean other head
tissue - 1) next to the CE-T1w's, the mean and median of the ratio of the two per patient
(1 = all the enhancement, 0 = none; the issue's bar is within 30 %, i.e. >= 0.7), and the head
and tumour MAE in seed 001's convention (x1e3, images scaled to [0, 1]). Then, per method,
the failure this product must not have: studies screening accepts (``screening_accepted``)
whose synthetic tumour keeps less than 70 % or more than 130 % of the CE-T1w's excess contrast
while the low-confidence helper covers less than half of the tumour.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluation", type=Path)
    parser.add_argument("cohort", type=Path)
    parser.add_argument("--by", default="institution", choices=("institution", "t1w", "t2w",
                                                                 "ce"))
    args = parser.parse_args()
    drawn = {p["patient"]: p["randomized"]["families"]
             for p in json.loads((args.cohort / "cohort.json").read_text())["patients"]
             if p.get("randomized")}
    cells: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    with open(args.evaluation / "evaluation.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if args.by == "institution":
                group = row["institution"]
            elif row["patient"] in drawn:
                group = drawn[row["patient"]][args.by]
            else:
                continue
            cells[(group, row["method"])].append(row)
    print(f"{args.by} | method | n | tumour excess | CE-T1w's | ratio mean | ratio median | "
          "head MAE x1e3 [0,1] | tumour MAE x1e3 [0,1]")
    for (group, method), rows in sorted(cells.items()):
        def mean(key: str, rows: list[dict[str, str]] = rows) -> float:
            return statistics.fmean(float(r[key]) for r in rows)

        ratios = [float(r["tumour_excess"]) / float(r["tumour_excess_ce"]) for r in rows]
        print(f"{group} | {method} | {len(rows)} | {mean('tumour_excess'):.2f} | "
              f"{mean('tumour_excess_ce'):.2f} | {statistics.fmean(ratios):.2f} | "
              f"{statistics.median(ratios):.2f} | {mean('seed001_head_mae_x1000'):.1f} | "
              f"{mean('seed001_tumour_mae_x1000'):.1f}")
    print("\nmethod | accepted by screening | of them off > 30 % | of those < half covered "
          "by the low-confidence helper (patient: share kept, tumour covered)")
    methods = sorted({method for _, method in cells})
    for method in methods:
        rows = [r for (_, m), part in cells.items() if m == method for r in part]
        if not any(r.get("screening_accepted") for r in rows):
            continue  # a baseline: nothing screened
        accepted = [r for r in rows if r.get("screening_accepted") == "1"]
        off = [r for r in accepted
               if abs(float(r["tumour_excess"]) / float(r["tumour_excess_ce"]) - 1) > 0.3]
        missed = [r for r in off if float(r["tumour_low_confidence_share"]) < 0.5]
        listed = ", ".join(
            f"{r['patient']}: {float(r['tumour_excess']) / float(r['tumour_excess_ce']):.2f}, "
            f"{float(r['tumour_low_confidence_share']):.0%}" for r in missed)
        print(f"{method} | {len(accepted)} of {len(rows)} | {len(off)} | {len(missed)}"
              + (f" ({listed})" if listed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
