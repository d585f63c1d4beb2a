"""The simulator's command: ``vcemri simulate``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .sites import SITES


def _institutions(text: str) -> tuple[str, ...]:
    if text.strip().lower() == "none":
        return ()
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in keys if k not in SITES]
    if unknown or not keys:
        raise argparse.ArgumentTypeError(
            f"unknown institution {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(SITES)}"
        )
    return keys


def _families(role: str) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        from .randomized import check_families

        names = tuple(n.strip() for n in text.split(",") if n.strip())
        try:
            check_families({role: names})  # type: ignore[dict-item]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return names
    return parse


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
        randomized=args.randomize,
        random_name=args.random_name,
        random_groups=args.random_groups,
        lesions=args.lesions,
        families=tuple((role, names) for role, names in
                       (("t1w", args.t1w_families), ("t2w", args.t2w_families)) if names),
        dwi=args.dwi,
    )
    check_output_directory(Path(args.out), args.overwrite)
    total = len(options.institutions) * options.patients_per_institution + options.randomized
    with tqdm(total=total, unit="patient", desc="simulating", file=sys.stderr,
              disable=args.quiet) as bar:
        records = simulate_cohort(
            Path(args.out), options, preview=args.preview, workers=args.workers,
            overwrite=args.overwrite,
            progress=lambda record: _advance(bar, record.patient),
        )
    volumes = sorted(r.tumour_volume_ml for r in records)
    randomized = (f" and {options.randomized} with randomised protocols"
                  if options.randomized else "")
    print(f"simulated {len(records)} patients from {len(options.institutions)} institutions"
          f"{randomized} into {args.out}")
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
        help=f"comma-separated institution keys, or 'none' (default: all of "
        f"{','.join(SITES)})",
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
    randomized = parser.add_argument_group(
        "randomised protocols", "patients whose scanner, sequences, TR/TE/TI/flip, scaling, "
        "geometry, bias, noise, obliquity and artefacts are drawn per patient from wide "
        "ranges (docs/randomized-protocols.md)")
    randomized.add_argument("--randomize", type=int, default=0, metavar="N",
                            help="add N randomised-protocol patients (default 0)")
    randomized.add_argument("--random-name", default="random", metavar="NAME",
                            help="their institution in the manifest (default 'random'; use "
                            "another name for a test cohort, so that evaluate counts it as "
                            "external)")
    randomized.add_argument("--random-groups", type=int, default=1, metavar="K",
                            help="list them as K institutions NAME1..NAMEK, dealt in turn "
                            "(training takes equal patients per institution; default 1)")
    randomized.add_argument("--t1w-families", type=_families("t1w"), default=None,
                            metavar="LIST", help="T1w families to draw from (default all: "
                            "SE,TSE,GRE2D,GRE3D,IR)")
    randomized.add_argument("--t2w-families", type=_families("t2w"), default=None,
                            metavar="LIST", help="T2w families to draw from (default all: "
                            "TSE,TSE-FS,STIR)")
    parser.add_argument("--lesions", type=int, default=0, metavar="N",
                        help="paint N extra lesions of random size (6-60 mm), shape, site and "
                        "necrosis into every patient (seed 004's tumour augmentation; "
                        "default 0)")
    parser.add_argument("--dwi", action="store_true",
                        help="also acquire diffusion-weighted imaging: one SE-EPI series with "
                        "b = 0 and 1000 s/mm2 (lower resolution, EPI distortion) and its ADC "
                        "map, as roles dwi and adc (default: off; without it the cohort is "
                        "the same as before)")
    parser.add_argument("--preview", action="store_true",
                        help="write preview.png: one patient per institution")
    parser.add_argument("--workers", type=int, default=_default_workers(), metavar="N",
                        help="parallel processes (default: CPUs, at most 4)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_simulate)
