"""IMPORTANT-Net with fewer or more inputs, from one `vcemri evaluate` run whose models are one
checkpoint given several input subsets (``CKPT@t1w``, ``@t2w``, ``@t1w+t2w``,
``@t1w+t2w+dwi``) beside other models (MMgSN-Net) and 'VCE = T1w' (issue 17's table).

    python benchmarks/subsets.py EVALUATION_DIR

Reads EVALUATION_DIR/evaluation.csv and prints, per group (internal, external) and method:
patients, MAE, head MAE and tumour MAE in seed 000's convention (scanner units, on the
256 x 224 grid), head SSIM, and the share of the CE-T1w's tumour excess contrast kept (mean of
the per-patient ratio); then, for every pair of subsets of one checkpoint where one holds the
other, whether more inputs give a tumour MAE no larger than fewer: mean difference, patients
where more is better, and a paired Wilcoxon signed-rank p (scipy).
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
from collections import defaultdict
from pathlib import Path

from scipy.stats import wilcoxon

COLUMNS = (("MAE", "seed000_whole_mae"), ("head MAE", "seed000_head_mae"),
           ("tumour MAE", "seed000_tumour_mae"), ("head SSIM", "seed000_head_ssim"))

#: A label naming a subset: "IMPORTANT-Net {T1w, T2w}".
SUBSET = re.compile(r"^(?P<model>.*?)\s*\{(?P<inputs>[^}]*)\}$")


def _subset(method: str) -> tuple[str, frozenset[str]] | None:
    found = SUBSET.match(method)
    if found is None:
        return None
    return found["model"], frozenset(s.strip() for s in found["inputs"].split(","))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluation", type=Path)
    args = parser.parse_args()
    rows: dict[tuple[str, str], dict[str, dict[str, str]]] = defaultdict(dict)
    with open(args.evaluation / "evaluation.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            rows[(row["group"], row["method"])][row["patient"]] = row
    print("group | method | n | " + " | ".join(name for name, _ in COLUMNS)
          + " | tumour excess kept")
    print("|".join(["---"] * (4 + len(COLUMNS))))
    for (group, method), patients in sorted(rows.items()):
        values = list(patients.values())

        def mean(key: str, values: list[dict[str, str]] = values) -> float:
            return statistics.fmean(float(v[key]) for v in values)

        kept = statistics.fmean(float(v["tumour_excess"]) / float(v["tumour_excess_ce"])
                                for v in values)
        cells = " | ".join(f"{mean(key):.4g}" for _, key in COLUMNS)
        print(f"{group} | {method} | {len(values)} | {cells} | {kept:.2f}")
    print("\nmore inputs against fewer (tumour MAE, seed 000 convention; negative: more is "
          "better)")
    print("group | more | fewer | mean difference | patients better with more | Wilcoxon p "
          "| holds")
    for (group, more), more_rows in sorted(rows.items()):
        big = _subset(more)
        if big is None:
            continue
        for (other_group, fewer), fewer_rows in sorted(rows.items()):
            small = _subset(fewer)
            if other_group != group or small is None or small[0] != big[0] or \
                    not small[1] < big[1]:
                continue
            shared = sorted(set(more_rows) & set(fewer_rows))
            differences = [float(more_rows[p]["seed000_tumour_mae"])
                           - float(fewer_rows[p]["seed000_tumour_mae"]) for p in shared]
            better = sum(d < 0 for d in differences)
            p = wilcoxon(differences).pvalue if any(differences) else 1.0
            mean_difference = statistics.fmean(differences)
            print(f"{group} | {more} | {fewer} | {mean_difference:+.1f} | {better} of "
                  f"{len(shared)} | {p:.2g} | {'yes' if mean_difference <= 0 else 'no'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
