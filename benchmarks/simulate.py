"""Seconds per simulated patient (three series and the masks written to disk), per
institution, at full matrix size, one process.

    python benchmarks/simulate.py [--repeats 3] [--institutions inst1,inst5] [--slices N]

Prints the machine, then per institution the median of the repeats, the matrix and slices.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe
from simulation import SITES, SimulationOptions, default_slices, simulate_patient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--institutions", default=",".join(SITES))
    parser.add_argument("--slices", type=int, default=None)
    args = parser.parse_args()
    print(describe(("numpy", "pydicom", "highdicom", "SimpleITK")))
    print(f"{'institution':<12} {'matrix':>9} {'slices':>6} {'s/patient':>10}  (median of {args.repeats})")
    medians = []
    for key in args.institutions.split(","):
        profile = SITES[key]
        options = SimulationOptions(institutions=(key,), slices=args.slices)
        times = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.repeats):
                start = time.perf_counter()
                simulate_patient(Path(tmp), key, i + 1, options)
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        medians.append(median)
        slices = args.slices or default_slices(profile.grid)
        matrix = f"{profile.grid.rows}x{profile.grid.columns}"
        print(f"{key:<12} {matrix:>9} {slices:>6} {median:>10.2f}")
    print(f"all institutions: median {statistics.median(medians):.2f} s/patient")


if __name__ == "__main__":
    main()
