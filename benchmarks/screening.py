"""Screening on data the model was not tuned to: in-distribution studies of every simulated
site (the model's training sites give internal patients, the others external ones) and
every fault kind the fitness screening is meant to catch, with severities, through the
shipped model's pipeline (screening recorded, not enforced).

    python benchmarks/screening.py [--model builtin] [--patients 3] [--seed 11] [--slices N]
    python benchmarks/screening.py --cohort MANIFEST [--model builtin]

Prints the machine, the false-refusal rate on clean internal and external studies, then per
fault kind and severity: how many studies, the share refused, the AUROC of the combined
model-based score (fitness classifier and OOD distance, synthesis.Screening.combined) against
the clean studies, and which stage refused them (checks without a model, the fitness
classifier, the OOD score). The cohort's seed is not the one the shipped model trained on.

With ``--cohort`` it screens every study of an existing cohort instead (e.g. protocols the
model never saw, ``vcemri simulate --randomize``) and prints, per institution, how many are
refused, by which stage, and every reason's first words with its count.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe
from config import InputError
from simulation import SITES, SimulationOptions, simulate_patient
from simulation.sites import Grid, PulseSequence
from synthesis import PipelineOptions, Synthesizer, Volume, read_series

Pair = tuple[Volume, Volume]


def _image_like(volume: Volume, array: np.ndarray) -> Volume:
    image = sitk.GetImageFromArray(np.asarray(array, np.float32))
    image.CopyInformation(volume.image)
    return Volume(image, volume.info, volume.sources)


def _moved(volume: Volume, mm: float) -> Volume:
    """The same images, the patient moved ``mm`` along the rows (left-right) in plane."""
    image = sitk.Image(volume.image)
    direction = np.reshape(image.GetDirection(), (3, 3))
    image.SetOrigin(tuple(np.asarray(image.GetOrigin()) + mm * direction[:, 0]))
    return Volume(image, volume.info, volume.sources)


def _rician(volume: Volume, rng: np.random.Generator) -> Volume:
    level = float(np.mean(volume.array[volume.array > np.percentile(volume.array, 50)]))
    noise = np.hypot(rng.normal(0, level, volume.shape), rng.normal(0, level, volume.shape))
    return _image_like(volume, noise)


def _ghosted(volume: Volume, amplitude: float) -> Volume:
    array = volume.array
    return _image_like(volume, array + amplitude * np.roll(array, array.shape[1] // 2, axis=1))


def _biased(volume: Volume, fold: float) -> Volume:
    array = volume.array
    ramp = np.exp(np.log(fold) / 2 * np.linspace(-1, 1, array.shape[2]))[None, None, :]
    return _image_like(volume, array * ramp)


#: Faults made from a clean pair: (kind, severity) -> transform.
TRANSFORMS: dict[tuple[str, str], Callable[[Pair, np.random.Generator], Pair]] = {
    ("swapped labels", "T2w pixels as T1w and the reverse, headers kept"):
        lambda p, r: (Volume(p[1].image, p[0].info, p[1].sources),
                      Volume(p[0].image, p[1].info, p[0].sources)),
    ("T2w copies the T1w", "identical pixels"):
        lambda p, r: (p[0], Volume(p[0].image, p[1].info, p[0].sources)),
    ("T2w copies the T1w", "pixels x 1.7"):
        lambda p, r: (p[0], _image_like(Volume(p[0].image, p[1].info, p[0].sources),
                                        1.7 * p[0].array)),
    ("noise", "T2w of Rician noise"): lambda p, r: (p[0], _rician(p[1], r)),
    ("misregistration beyond the bound", "20 mm"): lambda p, r: (p[0], _moved(p[1], 20.0)),
    ("misregistration beyond the bound", "30 mm"): lambda p, r: (p[0], _moved(p[1], 30.0)),
    ("misregistration beyond the bound", "45 mm"): lambda p, r: (p[0], _moved(p[1], 45.0)),
    ("severe artefact", "T1w N/2 ghost 20 %"): lambda p, r: (_ghosted(p[0], 0.2), p[1]),
    ("severe artefact", "T1w N/2 ghost 40 %"): lambda p, r: (_ghosted(p[0], 0.4), p[1]),
    ("severe artefact", "T2w non-uniformity 12-fold"): lambda p, r: (p[0], _biased(p[1], 12.0)),
}

#: Faults simulated as their own studies: (kind, severity) -> simulate_patient keywords.
PROTON_DENSITY = PulseSequence("SE", "PD_TSE_TRA", (3000, 3000), (15, 15), echo_train_length=5,
                               sequence_name="*tse2d1_5")
T1_AS_T2 = PulseSequence("SE", "t2_tse_tra", (600, 600), (12, 12), sequence_name="*se2d1")
WIDE = Grid(256, 256, 1.56, 1.56, 5.0, 0.5)  # a pelvis field of view, 400 mm
SIMULATED: dict[tuple[str, str], Callable[[str], dict]] = {
    ("wrong body part", "a pelvis labelled head and neck"):
        lambda key: {"body": "pelvis", "site": dataclasses.replace(SITES[key], grid=WIDE,
                                                                   t2w_grid=None)},
    ("protocol far outside training", "proton density as the T1w"):
        lambda key: {"site": dataclasses.replace(SITES[key], t1w=PROTON_DENSITY)},
    ("protocol far outside training", "a T1-weighted SE as the T2w"):
        lambda key: {"site": dataclasses.replace(SITES[key], t2w=T1_AS_T2, t2w_grid=None)},
    ("tumour outside the trained sizes", "70 mm"): lambda key: {"tumour_diameter_mm": 70.0},
}


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney)."""
    if not positive or not negative:
        return float("nan")
    p, n = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size))


def stage(reasons: list[str]) -> str:
    """Which screening stage gave the first reason."""
    if not reasons:
        return "-"
    first = reasons[0]
    if "fitness classifier" in first:
        return "classifier"
    if "out-of-distribution" in first:
        return "ood"
    return "checks"


def screen(synthesizer: Synthesizer, pair: Pair) -> tuple[bool, float, list[str]]:
    """(refused, combined score, reasons) of one study, screening recorded."""
    try:
        result = synthesizer.run(*pair, enforce=False)
    except InputError as exc:  # refused before screening (e.g. not one patient or study)
        return True, float("inf"), [str(exc)]
    screening = result.screening
    combined = screening.combined if screening.combined is not None else 0.0
    return not screening.accepted, combined, list(screening.reasons)


def screen_cohort(synthesizer: Synthesizer, manifest: Path) -> int:
    """Screen every study of a manifest (patient,institution,role,path rows)."""
    import csv

    series: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)
    with open(manifest, newline="") as handle:
        for row in csv.DictReader(handle):
            series[(row["institution"], row["patient"])][row["role"]] = (
                manifest.parent / row["path"])
    refused: dict[str, list[bool]] = defaultdict(list)
    stages: dict[str, Counter[str]] = defaultdict(Counter)
    reasons: Counter[str] = Counter()
    accepted: list[str] = []
    for (institution, patient), paths in sorted(series.items()):
        pair = (read_series(paths["t1w"]), read_series(paths["t2w"]))
        no, _, why = screen(synthesizer, pair)
        refused[institution].append(no)
        stages[institution].update(stage([r]) for r in why)
        # a reason's words before its first measured value name its kind
        reasons.update({re.split(r" \(|:", r, maxsplit=1)[0].strip() for r in why})
        if not no:
            accepted.append(f"{patient} ({pair[0].info.description} + "
                            f"{pair[1].info.description})")
    print(f"{'institution':<12} {'studies':>7} {'refused':>8}  reasons by stage (a study may "
          "have several)")
    for institution, flags in refused.items():
        print(f"{institution:<12} {len(flags):>7} {sum(flags):>8}  "
              + ", ".join(f"{name} {n}" for name, n in sorted(stages[institution].items())))
    for line, count in sorted(reasons.items(), key=lambda item: -item[1]):
        print(f"  {count} x {line}")
    print("accepted: " + (", ".join(accepted) or "none"))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, default=None, metavar="MANIFEST",
                        help="screen this cohort's studies instead of generating faults")
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--patients", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--slices", type=int, default=None,
                        help="slices per series (default: each site's ~120 mm of coverage)")
    args = parser.parse_args()
    print(describe(("torch", "numpy", "SimpleITK")))
    synthesizer = Synthesizer(args.model, PipelineOptions(device="cpu"))
    if args.cohort is not None:
        print(f"model {args.model}; cohort {args.cohort}")
        return screen_cohort(synthesizer, args.cohort)
    trained = {p.key for p in synthesizer.checkpoint.meta.institutions}
    options = SimulationOptions(seed=args.seed, slices=args.slices,
                                patients_per_institution=args.patients)
    print(f"model {args.model} (trained on {', '.join(sorted(trained))}); cohort seed "
          f"{args.seed}, {args.patients} patients per site, "
          f"{args.slices or 'the sites default'} slices")
    clean: dict[str, list[float]] = defaultdict(list)
    refused_clean: dict[str, list[bool]] = defaultdict(list)
    faults: dict[tuple[str, str], list[tuple[bool, float, str]]] = defaultdict(list)
    reasons_seen: Counter[str] = Counter()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="vcemri-screening-") as tmp:
        out = Path(tmp)
        for key in SITES:
            group = "internal" if key in trained else "external"
            for index in range(1, args.patients + 1):
                record = simulate_patient(out / "clean", key, index, options)
                folder = out / "clean"
                pair = (read_series(folder / record.paths["t1w"]),
                        read_series(folder / record.paths["t2w"]))
                refused, score, reasons = screen(synthesizer, pair)
                clean[group].append(score)
                refused_clean[group].append(refused)
                reasons_seen.update(f"clean {group}: {r[:90]}" for r in reasons)
                # faults of the same patient: every external one, the first of each internal
                if group == "internal" and index > 1:
                    continue
                for fault, make in TRANSFORMS.items():
                    refused, score, reasons = screen(synthesizer, make(pair, rng))
                    faults[fault].append((refused, score, stage(reasons)))
                for fault, keywords in SIMULATED.items():
                    variant = out / f"{fault[0]}-{fault[1]}".replace(" ", "_")
                    record = simulate_patient(variant, key, index, options, **keywords(key))
                    faulty = (read_series(variant / record.paths["t1w"]),
                              read_series(variant / record.paths["t2w"]))
                    refused, score, reasons = screen(synthesizer, faulty)
                    faults[fault].append((refused, score, stage(reasons)))
    negatives = clean["internal"] + clean["external"]
    for group in ("internal", "external"):
        flags = refused_clean[group]
        print(f"clean {group} studies: {len(flags)}, falsely refused {sum(flags)} "
              f"({100 * np.mean(flags):.1f} %)")
    for line, count in sorted(reasons_seen.items()):
        print(f"  {count} x {line}")
    print(f"{'fault':<36} {'severity':<46} {'n':>3} {'refused':>8} {'AUROC':>6}  stages")
    for (kind, severity), rows in faults.items():
        refused = [r for r, _, _ in rows]
        stages = Counter(s for _, _, s in rows)
        print(f"{kind:<36} {severity:<46} {len(rows):>3} {100 * np.mean(refused):>7.1f}% "
              f"{auroc([s for _, s, _ in rows], negatives):>6.3f}  "
              + ", ".join(f"{name} {n}" for name, n in sorted(stages.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
