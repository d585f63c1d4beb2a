"""Evaluating a model on a manifest: each patient through ``planning.SynthesisService``, the
service the node and ``process`` deliver with (the same models and passes: the VCE is the mean
of the plain and the mirrored pass, exactly what a TPS receives; screening is not applied, so
every patient is scored), compared with the acquired CE-T1w next to the trivial baseline
'VCE = T1w'; a table per institution, internal and external (from the run's split.json),
mean +- SD, written as CSV (per patient) and Markdown. Patients of the manifest that are not
evaluated (the model trained on them, or they are in no group asked for) are listed with why.

Two grids. The seeds compute their metrics on the model's 256 x 224 grid, every image resampled
to it bilinearly (seed 001 Methods): the main columns do the same (the acquired CE-T1w and
T1w resampled so, the VCE as the network put it out). The node delivers the VCE on the acquired
T1w grid, after the way back (synthesis/preprocess.py), which no network output can make
sharper than the 256 x 224 grid allowed: the "T1w grid" columns measure that, and on a
320 x 320 acquisition they are bounded by what resampling to 256 x 224 and back keeps. A model
trained at a fixed pixel spacing (``vcemri train --spacing-mm``) never sees the 256 x 224
grid: its main columns take the delivered VCE there as they take the CE-T1w, and its "T1w
grid" columns are bounded by its spacing instead.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

import synthesis

from .dataset import OPTIONAL_INPUTS, PatientEntry, read_manifest, tumour_mask
from .metrics import study_metrics
from .reliability import (
    excess_contrast,
    patient_reliability,
    reliability_figure,
    reliability_markdown,
    site_reliability,
)
from .report import (
    BASELINE,
    Example,
    example_figure,
    paired_tests,
    tests_markdown,
    training_curves,
    write_html,
)
from .trainer import model_split, training_sites

#: Metric keys of the acquired T1w grid carry this prefix (the others: the model grid).
ACQUIRED = "acquired_"

#: Columns of the summary table: (metric key, header).
TABLE = (
    ("seed000_whole_mae", "MAE"), ("seed000_whole_ssim", "SSIM"),
    ("seed000_whole_psnr", "PSNR"), ("seed000_head_mae", "head MAE"),
    ("seed000_head_ssim", "head SSIM"), ("seed000_tumour_mae", "tumour MAE"),
    ("seed001_whole_mae_x1000", "MAE x1e3 [0,1]"), ("seed001_whole_psnr", "PSNR [0,1]"),
    (f"{ACQUIRED}seed000_head_mae", "head MAE, T1w grid"),
    (f"{ACQUIRED}seed000_head_ssim", "head SSIM, T1w grid"),
    (f"{ACQUIRED}seed000_tumour_mae", "tumour MAE, T1w grid"),
    ("tumour_excess", "tumour excess contrast"),
    ("tumour_excess_ce", "CE-T1w's tumour excess"),
)
#: Columns that describe the reference, not a method: no paired test between methods.
REFERENCE_COLUMNS = ("tumour_excess_ce",)

#: Per-patient confidence figures of each model (training/reliability.py).
CONFIDENCE_KEYS = ("confidence_spearman", "tumour_excess_error", "tumour_low_confidence_share",
                   "low_confidence_head_share")

#: Why a patient of the split is not evaluated (groups not asked for).
LEFT_OUT = {"train": "the model was trained on this patient",
            "dropped": "left out of training by mixture modelling (equal patients per "
                       "institution); not in the groups evaluated",
            "internal": "internal evaluation patient; not in the groups evaluated",
            "external": "external patient; not in the groups evaluated"}


@dataclass
class Evaluation:
    """Per-patient rows, the mean +- SD table, paired tests, example slices, the models."""

    rows: list[dict[str, object]]
    markdown: str
    tests: list[dict[str, object]] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    models: dict[str, Path] = field(default_factory=dict)
    #: patients of the manifest not evaluated -> why
    left_out: dict[str, str] = field(default_factory=dict)
    #: how well each model's confidence map tells its errors, per site (reliability.py)
    reliability: list[dict[str, Any]] = field(default_factory=list)
    #: why the patients could not be grouped by the first model's split (empty when they were)
    no_split: str = ""


def _group(patient: str, split: dict[str, list[str]]) -> str:
    for name in ("train", "internal", "external"):
        if patient in split.get(name, []):
            return name
    return "unlisted"


def _unseen_split(checkpoint: synthesis.Checkpoint,
                  entries: list[PatientEntry]) -> dict[str, list[str]]:
    """Every patient of a cohort the model never saw: those of its training institutions are
    internal (unseen patients of a known site), the others external."""
    sites = training_sites(checkpoint)
    split: dict[str, list[str]] = {"internal": [], "external": []}
    for entry in entries:
        split["internal" if entry.institution in sites else "external"].append(entry.patient)
    return split


def _foreign(checkpoint: synthesis.Checkpoint, manifest: Path) -> bool:
    """Whether ``manifest`` is a simulated cohort of other people than the one the model
    trained on: its patients share IDs with the training cohort's but not their persons. A
    simulated patient is drawn from (seed, institution, index) alone, so only another seed
    makes other people: the same seed with extra lesions, randomised patients added, other
    slice counts or options a later simulator added (an older checkpoint does not record
    them) holds the same people, whose training patients must stay out of the test groups."""
    trained = checkpoint.meta.training.get("cohort")
    beside = Path(manifest).with_name("cohort.json")
    if trained is None or not beside.is_file():
        return False
    return json.loads(beside.read_text()).get("options", {}).get("seed") != trained.get("seed")


def _split(path: Path, checkpoint: synthesis.Checkpoint, entries: list[PatientEntry],
           manifest: Path | None = None, why_none: list[str] | None = None
           ) -> dict[str, list[str]]:
    """The split of the run that trained the model: ``split.json`` beside the checkpoint, else
    (the built-in model, a copied checkpoint) the same split recomputed from the seed, training
    institutions and internal fraction the checkpoint records (the study design depends on
    nothing else), else none: every patient is then in the group 'all'. A simulated cohort
    other than the training one is all unseen (:func:`_unseen_split`). ``why_none`` receives
    the reason when there is none."""
    if manifest is not None and _foreign(checkpoint, manifest):
        return _unseen_split(checkpoint, entries)
    split, why = model_split(path, checkpoint, [(e.patient, e.institution) for e in entries])
    if why is not None and why_none is not None:
        why_none.append(why)
    return split


def _labels(models: Path | list[Path] | dict[str, Path]) -> dict[str, Path]:
    if isinstance(models, dict):
        return {k: Path(v) for k, v in models.items()}
    if isinstance(models, (str, Path)):
        return {"model": Path(models)}
    if len(models) == 1:
        return {"model": Path(models[0])}
    labels: dict[str, Path] = {}
    for path in map(Path, models):
        label = path.parent.name or path.stem
        while label in labels or label == BASELINE:
            label += "'"
        labels[label] = path
    return labels


#: Inputs a model may be limited to with ``CKPT@t1w+t2w`` (seed 003's subsets).
SUBSET_ROLES = ("t1w", "t2w", *OPTIONAL_INPUTS)


def model_spec(path: Path | str) -> tuple[Path, tuple[str, ...] | None]:
    """``CKPT`` or ``CKPT@t1w+dwi`` -> (checkpoint, the inputs the network is given; None:
    every one it reads). A model that accepts subsets (IMPORTANT-Net trained with modality
    dropout) is then measured on that subset; the T1w still sets the output's grid and
    scanner units."""
    text = str(path)
    base, at, subset = text.rpartition("@")
    if at and subset and all(r in SUBSET_ROLES for r in subset.split("+")):
        return Path(base), tuple(subset.split("+"))
    return Path(text), None


def _example_slice(tumour: np.ndarray | None, depth: int) -> int:
    if tumour is not None and tumour.any():
        return int(np.argmax(tumour.reshape(depth, -1).sum(axis=1)))
    return depth // 2


def evaluate(models: Path | list[Path] | dict[str, Path], manifest: Path,
             groups: tuple[str, ...] = ("internal", "external"), device: str = "auto",
             progress: Callable[[str | None, int], None] | None = None,
             edm: bool = True, confidence: bool = True,
             keep_t1w_detail: bool = False,
             second_opinion: str | None = None) -> Evaluation:
    """Metrics for the manifest's patients in ``groups`` of the first model's split (all
    patients when it has none, see :func:`_split`), for each model (label -> checkpoint; one
    model is labelled 'model') and 'VCE = T1w'; with paired tests and one example slice per
    institution. ``progress(None, total)`` is called before the first patient and
    ``progress(patient, total)`` after each; ``edm`` False evaluates without external
    distribution matching; ``confidence`` False without the mirrored pass (the VCE is the
    plain pass, half the time; no confidence map, so its columns are empty);
    ``keep_t1w_detail`` with the T1w's detail added back, ``second_opinion`` with that
    model's confidence map joined to each model's (``PipelineOptions``)."""
    import planning
    from config import Settings

    labelled = _labels(models)
    service = planning.SynthesisService(Settings())
    entries = read_manifest(manifest)
    first = next(iter(labelled))
    specs = {label: model_spec(path) for label, path in labelled.items()}
    synthesizer, _ = service.synthesizer(checkpoint=str(specs[first][0]), device=device,
                                         edm=edm, confidence=confidence,
                                         keep_t1w_detail=keep_t1w_detail,
                                         second_opinion=second_opinion)
    why_none: list[str] = []
    split = _split(specs[first][0], synthesizer.checkpoint, entries, manifest, why_none)
    no_split = "" if split else (
        f"No split for {first}: {'; '.join(why_none) or 'it records none'}. Every patient is "
        "evaluated in the group 'all', its training patients among them if the manifest holds "
        "any: give a split.json beside the model, or list first a model whose split fits.")
    wanted = {role for _, subset in specs.values() for role in (subset or SUBSET_ROLES)}
    chosen, left_out = [], {}
    for entry in entries:
        group = _group(entry.patient, split) if split else "all"
        if split and group not in groups:
            left_out[entry.patient] = LEFT_OUT.get(group, f"in no group of the split ({group})")
        else:
            chosen.append((entry, group))
    rows: list[dict[str, object]] = []
    examples: list[Example] = []
    measured: list[tuple[str, str, Any]] = []
    if progress is not None:
        progress(None, len(chosen))
    for entry, group in chosen:
        t1 = synthesis.read_volume(entry.paths["t1w"])
        t2 = synthesis.read_volume(entry.paths["t2w"])
        # further inputs (DWI, ADC) for the models that read them
        extra = {role: synthesis.read_volume(entry.paths[role]) for role in OPTIONAL_INPUTS
                 if role in wanted and role in entry.paths}
        ce = synthesis.resample_onto(synthesis.read_volume(entry.paths["ce"]), t1)
        tumour = tumour_mask(entry.paths.get("mask"), t1.image)
        predictions, on_grid, results = {}, {}, {}
        head = None
        for label, (path, subset) in specs.items():
            # screening recorded, not enforced: every patient is scored, refusals counted
            results[label] = service.synthesize(t1, t2, checkpoint=str(path), device=device,
                                                enforce=False, edm=edm, extra=extra,
                                                confidence=confidence,
                                                keep_t1w_detail=keep_t1w_detail, use=subset,
                                                second_opinion=second_opinion)
            if head is None:
                head = sitk.GetArrayFromImage(results[label].foreground) > 0
            predictions[label] = results[label].vce.array
            on_grid[label] = results[label].model_grid
        assert head is not None
        truth = np.where(head, ce.array, 0.0)
        reliability = {label: patient_reliability(result, truth, head, tumour)
                       for label, result in results.items()}
        measured += [(label, group, entry.institution, found)
                     for label, found in reliability.items() if found is not None]
        predictions[BASELINE] = np.where(head, t1.array, 0.0)
        grid_head = synthesis.mask_to_model_grid(head)
        grid_truth = np.where(grid_head, synthesis.to_model_grid(ce.array).numpy(), 0.0)
        on_grid[BASELINE] = np.where(grid_head, synthesis.to_model_grid(t1.array).numpy(), 0.0)
        grid_tumour = None if tumour is None else synthesis.mask_to_model_grid(tumour)

        def excess(image: np.ndarray, tumour: np.ndarray | None = tumour,
                   head: np.ndarray = head) -> float:
            return float("nan") if tumour is None else excess_contrast(image, tumour, head)

        for name, prediction in predictions.items():
            acquired = study_metrics(truth, prediction, tumour, head)
            found = reliability.get(name)
            screening = results[name].screening if name in results else None
            rows.append({"patient": entry.patient, "institution": entry.institution,
                         "group": group, "method": name,
                         **study_metrics(grid_truth, on_grid[name], grid_tumour, grid_head),
                         **{ACQUIRED + k: v for k, v in acquired.items()},
                         "tumour_excess_ce": excess(truth),
                         "tumour_excess": excess(prediction),
                         **{k: (found.metrics[k] if found is not None else float("nan"))
                            for k in CONFIDENCE_KEYS},
                         "screening_accepted": "" if screening is None
                         else int(screening.accepted)})
        if not any(e.institution == entry.institution for e in examples):
            k = _example_slice(tumour, truth.shape[0])
            t2_on_t1 = synthesis.resample_onto(t2, t1).array
            examples.append(Example(entry.patient, entry.institution, group,
                                    np.where(head, t1.array, 0.0)[k], t2_on_t1[k], truth[k],
                                    predictions[next(iter(labelled))][k]))
        if progress is not None:
            progress(entry.patient, len(chosen))
    tests = paired_tests(rows, tuple(c for c in TABLE if c[0] not in REFERENCE_COLUMNS)) \
        if rows else []
    return Evaluation(rows, summary_markdown(rows), tests, examples, labelled, left_out,
                      site_reliability(measured), no_split)


def summary_markdown(rows: list[dict[str, object]]) -> str:
    """Mean +- SD per institution, group and method."""
    cells: dict[tuple[str, str, str], list[dict[str, object]]] = defaultdict(list)
    for row in rows:
        cells[(str(row["group"]), str(row["institution"]), str(row["method"]))].append(row)
    lines = ["| group | institution | method | n | " + " | ".join(h for _, h in TABLE) + " |",
             "|---|---|---|---|" + "---|" * len(TABLE)]
    for (group, site, method), members in sorted(cells.items()):
        values = []
        for key, _ in TABLE:
            data = np.array([float(m[key]) for m in members], float)  # type: ignore[arg-type]
            data = data[np.isfinite(data)]
            # one patient has no spread to show
            values.append("n/a" if not data.size else f"{data.mean():.3g}" if data.size == 1
                          else f"{data.mean():.3g} +- {data.std():.2g}")
        lines.append(f"| {group} | {site} | {method} | {len(members)} | "
                     + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


#: What the summary table holds.
TABLE_HEADING = (
    "Mean +- SD per institution (seed 000: L = 4095; seed 001: [0, 1]). Columns without a "
    "grid: on the model's 256 x 224 grid, as the seeds measure; 'T1w grid': on the acquired "
    "T1w grid, as the node delivers. 'head': inside the pipeline's head mask (the zeroed "
    "background makes whole-image figures look better than they are). Tumour excess contrast: "
    "mean tumour / mean other head tissue - 1 on the T1w grid, next to the acquired CE-T1w's. A "
    "single patient shows no SD.")


def left_out_markdown(left_out: dict[str, str]) -> str:
    """The patients not evaluated and why, grouped by reason."""
    if not left_out:
        return ""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for patient, reason in sorted(left_out.items()):
        by_reason[reason].append(patient)
    return "Patients not evaluated:\n\n" + "\n".join(
        f"- {len(patients)}: {reason} ({', '.join(patients)})"
        for reason, patients in by_reason.items()) + "\n"


def write(evaluation: Evaluation, out: Path) -> dict[str, Path]:
    """``evaluation.csv`` (every patient and method), ``evaluation.md`` (the table and the
    paired tests), ``significance.csv``, figures (``example-<institution>.png``,
    ``training-curves.png``) and ``report.html`` showing them all."""
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": out / "evaluation.csv", "markdown": out / "evaluation.md",
               "significance": out / "significance.csv", "html": out / "report.html"}
    with open(written["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(evaluation.rows[0]))
        writer.writeheader()
        writer.writerows(evaluation.rows)
    tests = tests_markdown(evaluation.tests) if evaluation.tests else ""
    left_out = left_out_markdown(evaluation.left_out)
    confidence = (reliability_markdown(evaluation.reliability) if evaluation.reliability
                  else "")
    written["markdown"].write_text(
        evaluation.markdown + ("\nPaired tests (Wilcoxon signed-rank, two-sided):\n\n" + tests
                               if tests else "")
        + (f"\nConfidence map against the actual error:\n\n{confidence}" if confidence else "")
        + (f"\n{left_out}" if left_out else "")
        + (f"\n{evaluation.no_split}\n" if evaluation.no_split else ""))
    with open(written["significance"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["group", "method", "versus", "metric", "n",
                                         "mean_difference", "p_value"])
        writer.writeheader()
        writer.writerows(evaluation.tests)
    images = []
    for example in evaluation.examples:
        path = example_figure(example, out / f"example-{example.institution}.png")
        images.append((f"{example.institution} ({example.group}): T1w, T2w, real CE-T1w, VCE "
                       "and |VCE - CE| in [0, 0.2] (seed 000 FIG. 3/9)", path))
    if evaluation.reliability:
        figure = reliability_figure(evaluation.reliability, out / "reliability.png",
                                    synthesis.CONFIDENCE_TOLERANCE)
        images.append(("reliability of the confidence map: mean |VCE - CE| per confidence bin "
                       "and site, against what the confidence says", figure))
    for label, model in evaluation.models.items():
        suffix = "" if len(evaluation.models) == 1 else f"-{label}"
        curves = training_curves(model.with_name("training_log.csv"),
                                 out / f"training-curves{suffix}.png")
        if curves is not None:
            images.append((f"training curves of {label} ({model})", curves))
    sections = [(TABLE_HEADING, evaluation.markdown)]
    if tests:
        sections.append(("Paired tests (Wilcoxon signed-rank, two-sided)", tests))
    reliability = reliability_markdown(evaluation.reliability) if evaluation.reliability else ""
    if reliability:
        sections.append(("Does the confidence map tell where the VCE is wrong? (first model; "
                         "T1w grid, inside the head)", reliability))
    if left_out:
        sections.append(("Patients not evaluated", left_out))
    models = "\n".join(f"| {k} | {v} |" for k, v in evaluation.models.items())
    sections.insert(0, ("Models", "| label | checkpoint |\n|---|---|\n" + models))
    write_html(written["html"], "vcemri evaluation", sections, images)
    for _, path in images:
        written[path.stem] = path
    return written
