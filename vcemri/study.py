"""The seeds' studies with one command: ``vcemri study DESIGN --out DIR --scale SCALE``.

A design names its arms (one trained model each, or another arm's model evaluated another
way) and the seed finding it tests. The study simulates its own cohort (seed
:data:`COHORT_SEED`, which neither the shipped model nor the tests use), draws one patient
split for the whole study (``split.json``: every arm is trained and compared on the same
patients; an arm trained on fewer institutions takes its institutions' share), trains each
arm with ``vcemri train``'s code and evaluates it with ``vcemri evaluate``'s, and writes one
report: ``report.md`` (tables in the seeds' layout: mean +- SD per institution, internal and
external; paired Wilcoxon tests; whether the simulated data reproduce the seed's direction),
``study.csv`` (every patient, arm and metric), ``significance.csv`` and ``mae.png``.

Every step is kept on disk (``runs/<arm>``, ``evaluations/<arm>``): a study interrupted at
any point and started again with the same command resumes an interrupted training where it
stopped and skips what is done.

It lives in ``vcemri`` because it wires simulation (the cohort) to training, which never
imports the simulator. The arms are the seeds' plain models (no confidence module, no
fitness classifier), trained on the three fixed sites inst1-inst3; the other sites are
external. ``--scale smoke`` checks the machinery in minutes (its numbers mean nothing);
``small`` is sized for 2 CPU cores (under two hours for the largest design); ``full`` is the
GPU recipe (the seeds' 200 epochs at full width and resolution).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import simulation
import synthesis
import training
from config import InputError

#: training.BASELINE, named here so that building the parser loads no torch
BASELINE = "VCE = T1w"

#: The study cohort's seed: not the shipped model's training cohort (2026), nor a test's.
COHORT_SEED = 2101
#: Training institutions of every arm (a uni-institution arm takes one of them).
TRAINING_SITES = ("inst1", "inst2", "inst3")
#: The figure every verdict reads: MAE over the whole 256 x 224 image (seed 000 eq. 3).
VERDICT_METRIC = ("seed000_whole_mae", "MAE")
#: The metrics of the report's tables and tests (evaluation.csv keys, headers); lower is
#: better for MAE, higher for SSIM and PSNR.
METRICS = (VERDICT_METRIC, ("seed000_whole_ssim", "SSIM"), ("seed000_whole_psnr", "PSNR"),
           ("seed000_tumour_mae", "tumour MAE"), ("seed001_whole_mae_x1000", "MAE x1e3 [0,1]"))


@dataclass(frozen=True)
class Scale:
    """Cohort and training size of a study."""

    patients_per_institution: int
    slices: int | None  # None: each site's own coverage
    matrix_scale: float
    institutions: tuple[str, ...]
    epochs: int
    width: float
    batch_size: int
    crop: tuple[int, int] | None
    max_steps: int | None = None


SCALES: dict[str, Scale] = {
    "smoke": Scale(2, 6, 0.25, (*TRAINING_SITES, "inst4"), epochs=1, width=0.125,
                   batch_size=2, crop=None, max_steps=2),
    # 4 training + 2 internal patients per site, 12 slices each: 36 steps an epoch
    "small": Scale(6, 12, 0.5, (*TRAINING_SITES, "inst4", "inst5", "inst6", "inst7"),
                   epochs=10, width=0.25, batch_size=4, crop=(128, 96)),
    # seed 000: 200 epochs, batch size 1, full width, 256 x 224
    "full": Scale(20, None, 1.0, (*TRAINING_SITES, "inst4", "inst5", "inst6", "inst7"),
                  epochs=200, width=1.0, batch_size=1, crop=None),
}


@dataclass(frozen=True)
class Arm:
    """One model of a design (``options``: TrainOptions fields), or with ``model_of`` another
    arm's model evaluated differently (``edm`` False: without EDM)."""

    label: str
    options: Mapping[str, Any] = field(default_factory=dict)
    institutions: tuple[str, ...] = TRAINING_SITES
    edm: bool = True
    model_of: str | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")


@dataclass(frozen=True)
class Claim:
    """The seed's direction: ``arm`` has a lower MAE than each of ``versus`` in ``group``."""

    arm: str
    versus: tuple[str, ...]
    group: str


@dataclass(frozen=True)
class Design:
    name: str
    title: str
    #: what the seed found, in its words or numbers
    finding: str
    arms: tuple[Arm, ...]
    claims: tuple[Claim, ...]


def _normalization_arms() -> tuple[Arm, ...]:
    arms = [Arm(name, {"normalization": name}) for name in synthesis.NORMALIZATIONS]
    arms += [Arm(f"{name} without EDM", model_of=name, edm=False)
             for name in synthesis.NORMALIZATIONS if name.endswith("dataset")]
    return tuple(arms)


MMGSN = "MMgSN-Net"
DESIGNS: dict[str, Design] = {d.name: d for d in (
    Design("seed001-normalization", "Seed 001: six normalizations, with and without EDM",
           "patient-level z-score generalizes best to external institutions (seed 001)",
           _normalization_arms(),
           (Claim("zscore-patient", tuple(n for n in synthesis.NORMALIZATIONS
                                          if n != "zscore-patient"), "external"),)),
    Design("seed001-uni-vs-mixture", "Seed 001: one model per institution against the mixture",
           "the mixture model does better on external institutions than the best "
           "single-institution model (seed 000 Table 2: MAE 68.60 vs 72.14)",
           (Arm("mixture"), *(Arm(f"uni {site}", institutions=(site,))
                              for site in TRAINING_SITES)),
           (Claim("mixture", tuple(f"uni {s}" for s in TRAINING_SITES), "external"),)),
    Design("seed000-baselines", "Seed 000 Table 2: MMgSN-Net against the baselines",
           "MMgSN-Net has the lowest MAE: 13.1 % below Hi-Net, 3.5 % below the multi-channel "
           "U-Net, 31 % below CycleGAN (T1w) and 30 % below CycleGAN (T2w) (seed 000)",
           (Arm(MMGSN),
            Arm("U-Net T1w", {"architecture": "unet", "inputs": ("t1w",)}),
            Arm("U-Net T2w", {"architecture": "unet", "inputs": ("t2w",)}),
            Arm("U-Net T1w+T2w", {"architecture": "unet", "inputs": ("t1w", "t2w")}),
            Arm("Hi-Net", {"architecture": "hinet"}),
            Arm("pix2pix", {"architecture": "pix2pix", "inputs": ("t1w", "t2w")}),
            Arm("CycleGAN T1w", {"architecture": "cyclegan", "inputs": ("t1w",)}),
            Arm("CycleGAN T2w", {"architecture": "cyclegan", "inputs": ("t2w",)})),
           tuple(Claim(MMGSN, ("U-Net T1w", "U-Net T2w", "U-Net T1w+T2w", "Hi-Net", "pix2pix",
                               "CycleGAN T1w", "CycleGAN T2w"), group)
                 for group in ("internal", "external"))),
    Design("seed000-ablations", "Seed 000: MMgSN-Net's ablations",
           "removing SGS (concatenation instead), the multi-level module or self-attention "
           "each raises MAE by 1-3 % (seed 000)",
           (Arm(MMGSN), Arm("concat fusion", {"fusion": "concat"}),
            Arm("no multi-level module", {"multi_level": False}),
            Arm("no attention", {"attention": False})),
           (Claim(MMGSN, ("concat fusion", "no multi-level module", "no attention"),
                  "internal"),)),
    Design("seed000-edm", "Seed 000/001: EDM on external institutions",
           "external distribution matching (y = mu1/mu2 x) brings external institutions "
           "closer to the training data and improves their synthesis (seed 000 claims 1-25, "
           "seed 001); it can only act under dataset-level normalization",
           (Arm("EDM", {"normalization": "zscore-dataset"}),
            Arm("without EDM", model_of="EDM", edm=False)),
           (Claim("EDM", ("without EDM",), "external"),)),
)}


def _train_options(arm: Arm, scale: Scale, split: Path, device: str) -> training.TrainOptions:
    return training.TrainOptions(
        institutions=arm.institutions, epochs=scale.epochs, batch_size=scale.batch_size,
        width=scale.width, crop=scale.crop, max_steps=scale.max_steps, device=device,
        fitness_steps=0, confidence=False, split=str(split), **arm.options)


def _done(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def run_study(name: str, out: Path, scale_name: str = "small", device: str = "auto",
              say: Callable[[str], None] = print) -> Path:
    """Run (or resume) the design ``name`` in ``out``; returns the report's path."""
    if name not in DESIGNS:
        raise InputError(f"unknown study design {name!r} (known: {', '.join(DESIGNS)})")
    if scale_name not in SCALES:
        raise InputError(f"unknown scale {scale_name!r} (known: {', '.join(SCALES)})")
    chosen, scale = DESIGNS[name], SCALES[scale_name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cohort = out / "cohort"
    if not _done(cohort / "manifest.csv"):
        say(f"simulating the cohort: {scale.patients_per_institution} patients at each of "
            f"{', '.join(scale.institutions)} (seed {COHORT_SEED})")
        simulation.simulate_cohort(cohort, simulation.SimulationOptions(
            institutions=scale.institutions, seed=COHORT_SEED, slices=scale.slices,
            patients_per_institution=scale.patients_per_institution,
            matrix_scale=scale.matrix_scale), overwrite=True)  # over an interrupted one
    manifest = cohort / "manifest.csv"
    entries = training.read_manifest(manifest)
    patients = [(e.patient, e.institution) for e in entries]
    split_path = out / "split.json"
    if not _done(split_path):
        split_path.write_text(json.dumps(training.design(patients, training.TrainOptions(
            institutions=TRAINING_SITES)), indent=1))
    split = json.loads(split_path.read_text())
    models: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for arm in chosen.arms:
        if arm.model_of is not None:
            continue
        run = out / "runs" / arm.slug
        options = _train_options(arm, scale, split_path, device)
        if not _done(run / "model.safetensors"):
            resume = (run / "training_state.pt").is_file()
            say(f"training {arm.label}" + (" (resuming)" if resume else ""))
            training.train(manifest, run, options, resume=resume)
        models[arm.label] = run / "model.safetensors"
        seconds[arm.label] = float(synthesis.load_checkpoint(
            models[arm.label]).meta.training.get("seconds", float("nan")))
    rows: list[dict[str, Any]] = []
    for arm in chosen.arms:
        folder = out / "evaluations" / arm.slug
        model = models[arm.model_of or arm.label]
        if not _done(folder / "evaluation.csv"):
            say(f"evaluating {arm.label}")
            evaluation = training.evaluate_models({arm.label: model}, manifest, device=device,
                                                  edm=arm.edm)
            training.write_evaluation(evaluation, folder)
        rows += _study_rows(folder / "evaluation.csv", arm, split, first=arm is chosen.arms[0])
    report = _report(chosen, scale_name, rows, seconds, out)
    say(f"study done: {time.perf_counter() - started:.0f} s this run")
    return report


def _study_rows(path: Path, arm: Arm, split: Mapping[str, list[str]], first: bool
                ) -> list[dict[str, Any]]:
    """An arm's evaluation rows, grouped by the study's split (an institution another arm
    trained on is still internal here); the 'VCE = T1w' reference from the first arm only."""
    internal = set(split["internal"])
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["method"] == BASELINE and not first:
                continue
            if row["patient"] in internal:
                group = "internal"
            elif row["institution"] not in TRAINING_SITES:
                group = "external"
            else:  # a study training patient, external only to a uni-institution arm
                continue
            method = row["method"] if row["method"] == BASELINE else arm.label
            rows.append({**row, "group": group, "method": method})
    return rows


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "n/a"
    return f"{np.mean(values):.4g} +- {np.std(values, ddof=1) if len(values) > 1 else 0:.3g}"


def _tables(rows: list[dict[str, Any]], methods: list[str]) -> str:
    columns = sorted({(r["group"], r["institution"]) for r in rows},
                     key=lambda c: (c[0] != "internal", c[1]))
    parts = []
    for key, header in METRICS:
        lines = [f"**{header}** (mean +- SD over patients, n per column)", "",
                 "| method | " + " | ".join(f"{g} {i}" for g, i in columns)
                 + " | internal, all | external, all |",
                 "|---|" + "---|" * (len(columns) + 2)]
        for method in methods:
            mine = [r for r in rows if r["method"] == method]

            def cell(chosen: list[dict[str, Any]]) -> str:
                return f"{_mean_sd([float(r[key]) for r in chosen])} ({len(chosen)})"

            lines.append(f"| {method} | " + " | ".join(
                cell([r for r in mine if (r["group"], r["institution"]) == c]) for c in columns)
                + f" | {cell([r for r in mine if r['group'] == 'internal'])}"
                + f" | {cell([r for r in mine if r['group'] == 'external'])} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _verdicts(chosen: Design, rows: list[dict[str, Any]],
              tests: list[dict[str, Any]]) -> list[str]:
    key, header = VERDICT_METRIC
    means: dict[tuple[str, str], float] = {}
    for (method, group), values in _grouped(rows, key).items():
        means[(method, group)] = float(np.mean(values))
    lines = []
    for claim in chosen.claims:
        mine = means.get((claim.arm, claim.group), float("nan"))
        held, significant, details = [], [], []
        for other in claim.versus:
            theirs = means.get((other, claim.group), float("nan"))
            held.append(mine < theirs)
            test = next((t for t in tests if t["group"] == claim.group and t["metric"] == header
                         and {t["method"], t["versus"]} == {claim.arm, other}), None)
            p = float("nan") if test is None else float(test["p_value"])
            significant.append(bool(np.isfinite(p) and p < 0.05))
            details.append(f"{other} {theirs:.4g} (p = {p:.3g})" if np.isfinite(p)
                           else f"{other} {theirs:.4g} (p n/a)")
        direction = ("direction reproduced" if all(held) else "not reproduced"
                     if not any(held) else f"direction partly reproduced ({sum(held)} of "
                     f"{len(held)} comparisons)")
        strength = (", significant (p < 0.05) in every comparison" if all(significant)
                    else f", significant in {sum(significant)} of {len(significant)}")
        lines.append(f"- {claim.group}, {header}: {claim.arm} {mine:.4g} against "
                     + "; ".join(details) + f": **{direction}**{strength}")
    return lines


def _grouped(rows: list[dict[str, Any]], key: str) -> dict[tuple[str, str], list[float]]:
    grouped: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        value = float(row[key])
        if np.isfinite(value):
            grouped[(row["method"], row["group"])].append(value)
    return grouped


def _figure(rows: list[dict[str, Any]], methods: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, header = VERDICT_METRIC
    grouped = _grouped(rows, key)
    figure, axes = plt.subplots(1, 2, figsize=(max(6, 1.1 * len(methods)) * 2, 4),
                                sharey=True)
    for axis, group in zip(axes, ("internal", "external"), strict=True):
        shown = [m for m in methods if grouped.get((m, group))]
        axis.boxplot([grouped[(m, group)] for m in shown], showmeans=True)
        axis.set_xticks(range(1, len(shown) + 1), shown, rotation=30, ha="right", fontsize=8)
        axis.set_title(f"{group} patients")
        axis.set_ylabel(f"{header} per patient (scanner units)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _machine() -> str:
    import os
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable cores, {gpu}; "
            f"torch {torch.__version__}")


def _report(chosen: Design, scale_name: str, rows: list[dict[str, Any]],
            seconds: Mapping[str, float], out: Path) -> Path:
    methods = [a.label for a in chosen.arms] + [BASELINE]
    with open(out / "study.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    arms = [m for m in methods if m != BASELINE]
    pairs = {(c.arm, other) for c in chosen.claims for other in c.versus}
    tests = [t for t in training.paired_tests([r for r in rows if r["method"] != BASELINE],
                                              METRICS)
             if (t["method"], t["versus"]) in pairs or (t["versus"], t["method"]) in pairs]
    with open(out / "significance.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(tests[0]) if tests else ["group"])
        writer.writeheader()
        writer.writerows(tests)
    scale = SCALES[scale_name]
    timings = "\n".join(f"| {label} | {seconds[label]:.0f} |" for label in arms
                        if label in seconds)
    figure = _figure(rows, methods, out / "mae.png")
    text = [
        f"# {chosen.title}", "",
        f"`vcemri study {chosen.name} --scale {scale_name}`, written "
        f"{time.strftime('%Y-%m-%d')}.", "",
        f"**Seed finding:** {chosen.finding}.", "",
        "**On simulated data:**", "", *_verdicts(chosen, rows, tests), "",
        f"Cohort: `vcemri simulate` seed {COHORT_SEED}, {scale.patients_per_institution} "
        f"patients at each of {', '.join(scale.institutions)}, "
        f"{scale.slices or 'the sites own'} slices, matrix scale {scale.matrix_scale}; one "
        f"patient split for every arm (`split.json`): training institutions "
        f"{', '.join(TRAINING_SITES)} (70 % training, 30 % internal), the others external. "
        f"Training: {scale.epochs} epochs, width {scale.width}, batch {scale.batch_size}, "
        f"crop {scale.crop or 'none'}"
        + (f", at most {scale.max_steps} steps" if scale.max_steps else "")
        + "; the seeds' plain models (no confidence module, no fitness classifier). "
        "Each arm's own evaluation is in `evaluations/<arm>/`.", "",
        f"Machine: {_machine()}", "",
        "| arm | training (s) |", "|---|---|", timings, "",
        _tables(rows, methods),
        "Paired tests between the arms the finding compares (Wilcoxon signed-rank, two-sided, "
        "patients paired):", "", training.tests_markdown(tests) if tests else "(none)\n",
        f"![{VERDICT_METRIC[1]} per patient]({figure.name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path


def _study(args: argparse.Namespace) -> int:
    training.require_training_extra()
    report = run_study(args.design, Path(args.out), args.scale, args.device,
                       say=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"report: {report}")
    return 0


def add_commands(commands: Any) -> None:
    """Add ``vcemri study``."""
    study = commands.add_parser(
        "study",
        help="reproduce a seed's study on simulated data: train and evaluate every arm, "
        "write one report",
        description="Simulate a cohort, train every arm of the design on one shared patient "
        "split, evaluate each, and write OUT/report.md (mean +- SD per institution, "
        "internal and external, paired Wilcoxon tests, whether the seed's direction "
        "reproduces), study.csv, significance.csv and mae.png. Run the same command again "
        "to resume after an interruption. "
        + " ".join(f"{d.name}: {d.title}." for d in DESIGNS.values()),
    )
    study.add_argument("design", choices=tuple(DESIGNS))
    study.add_argument("--out", required=True, metavar="DIR")
    study.add_argument("--scale", choices=tuple(SCALES), default="small",
                       help="smoke: minutes, numbers meaningless; small (default): under 2 "
                       "hours on 2 CPU cores; full: the GPU recipe")
    study.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    study.set_defaults(handler=_study)
