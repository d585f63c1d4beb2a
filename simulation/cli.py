"""The simulator's command: ``vcemri simulate``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .sites import SITES


def _institutions(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in keys if k not in SITES]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(
            f"unknown institution {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(SITES)}"
        )
    return keys


def _advance(bar: Any, patient: str) -> None:
    bar.set_postfix_str(patient)
    bar.update(1)


def _simulate(args: argparse.Namespace) -> int:
    # Imported here: the simulator pulls in highdicom and SimpleITK, which every other
    # vcemri command would otherwise pay for at start-up.
    from tqdm import tqdm

    from .cohort import SimulationOptions, check_output_directory, simulate_cohort

    options = SimulationOptions(
        institutions=args.institutions,
        patients_per_institution=args.patients_per_institution,
        seed=args.seed,
        matrix_scale=args.matrix_scale,
        slices=args.slices,
        misalign_mm=args.misalign,
    )
    check_output_directory(Path(args.out), args.overwrite)
    total = len(options.institutions) * options.patients_per_institution
    with tqdm(total=total, unit="patient", desc="simulating", file=sys.stderr,
              disable=args.quiet) as bar:
        records = simulate_cohort(
            Path(args.out), options, preview=args.preview, workers=args.workers,
            overwrite=args.overwrite,
            progress=lambda record: _advance(bar, record.patient),
        )
    volumes = sorted(r.tumour_volume_ml for r in records)
    print(f"simulated {len(records)} patients from {len(options.institutions)} institutions "
          f"into {args.out}")
    print(f"manifest: {Path(args.out) / 'manifest.csv'}")
    print(f"tumour volumes: {volumes[0]:.1f}-{volumes[-1]:.1f} ml")
    if args.preview:
        print(f"preview: {Path(args.out) / 'preview.png'}")
    return 0


def _default_workers() -> int:
    """Processes for simulation: the CPUs this process may use, at most 4."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def add_commands(commands: Any) -> None:
    """Add ``simulate`` to the ``vcemri`` sub-command parser."""
    parser = commands.add_parser(
        "simulate",
        help="simulate a multi-institution NPC cohort as DICOM (T1w, T2w, CE-T1w, tumour)",
        description="Simulate head-and-neck MR of NPC patients at several institutions and "
        "write DICOM series, ground-truth tumour masks (NIfTI and DICOM SEG) and a manifest.",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument(
        "--institutions", type=_institutions, default=tuple(SITES), metavar="LIST",
        help=f"comma-separated institution keys (default: all of {','.join(SITES)})",
    )
    parser.add_argument("--patients-per-institution", type=int, default=5, metavar="N",
                        help="patients simulated at each institution (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    parser.add_argument("--matrix-scale", type=float, default=1.0, metavar="F",
                        help="scale every matrix by F keeping the field of view "
                        "(e.g. 0.5 for small test cohorts; default 1)")
    parser.add_argument("--slices", type=int, default=None, metavar="N",
                        help="slices per series (default: ~120 mm of coverage)")
    parser.add_argument("--misalign", type=float, default=0.0, metavar="MM",
                        help="move the patient up to MM mm (MM/2 degrees) between series")
    parser.add_argument("--preview", action="store_true",
                        help="write preview.png: one patient per institution")
    parser.add_argument("--workers", type=int, default=_default_workers(), metavar="N",
                        help="parallel processes (default: CPUs, at most 4)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_simulate)
