"""Evaluating a model on a manifest: each patient through the synthesis pipeline (as
``process`` runs it), compared with the acquired CE-T1w next to the trivial baseline
'VCE = T1w'; a table per institution, internal and external (from the run's split.json),
mean +- SD, written as CSV (per patient) and Markdown.

Two grids. The seeds compute their metrics on the model's 256 x 224 grid, every image resampled
to it bilinearly (seed 001 Methods): the main columns do the same (the acquired CE-T1w and
T1w resampled so, the VCE as the network put it out). The node delivers the VCE on the acquired
T1w grid, after the way back (synthesis/preprocess.py), which no network output can make
sharper than the 256 x 224 grid allowed: the "T1w grid" columns measure that, and on a
320 x 320 acquisition they are bounded by what resampling to 256 x 224 and back keeps.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import synthesis
from config import InputError

from .dataset import PatientEntry, read_manifest
from .metrics import study_metrics
from .report import (
    BASELINE,
    Example,
    example_figure,
    paired_tests,
    tests_markdown,
    training_curves,
    write_html,
)
from .trainer import TrainOptions, design

#: Metric keys of the acquired T1w grid carry this prefix (the others: the model grid).
ACQUIRED = "acquired_"

#: Columns of the summary table: (metric key, header).
TABLE = (
    ("seed000_whole_mae", "MAE"), ("seed000_whole_ssim", "SSIM"),
    ("seed000_whole_psnr", "PSNR"), ("seed000_tumour_mae", "tumour MAE"),
    ("seed001_whole_mae_x1000", "MAE x1e3 [0,1]"), ("seed001_whole_psnr", "PSNR [0,1]"),
    (f"{ACQUIRED}seed000_whole_mae", "MAE, T1w grid"),
    (f"{ACQUIRED}seed000_whole_ssim", "SSIM, T1w grid"),
)


@dataclass
class Evaluation:
    """Per-patient rows, the mean +- SD table, paired tests, example slices, the models."""

    rows: list[dict[str, object]]
    markdown: str
    tests: list[dict[str, object]] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    models: dict[str, Path] = field(default_factory=dict)


def _group(patient: str, split: dict[str, list[str]]) -> str:
    for name in ("train", "internal", "external"):
        if patient in split.get(name, []):
            return name
    return "unlisted"


def _split(path: Path, checkpoint: synthesis.Checkpoint,
           entries: list[PatientEntry]) -> dict[str, list[str]]:
    """The split of the run that trained the model: ``split.json`` beside the checkpoint, else
    (the built-in model, a copied checkpoint) the same split recomputed from the seed, training
    institutions and internal fraction the checkpoint records (the study design depends on
    nothing else), else none: every patient is then in the group 'all'."""
    beside = path.with_name("split.json")
    if str(path) != "builtin" and beside.is_file():
        return dict(json.loads(beside.read_text()))
    training = checkpoint.meta.training
    options = training.get("options") or {}
    if "seed" not in options:
        return {}
    sites = options.get("institutions") or training.get("training_institutions")
    try:
        return design([(e.patient, e.institution) for e in entries], TrainOptions(
            institutions=tuple(sites) if sites else None, seed=int(options["seed"]),
            internal_fraction=float(options.get("internal_fraction", 0.3))))
    except InputError:  # none of the model's training institutions is in this manifest
        return {}


def _tumour(path: Path | None, reference: sitk.Image) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    mask = sitk.Resample(sitk.ReadImage(str(path)), reference, sitk.Transform(),
                         sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(mask) > 0


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


def _example_slice(tumour: np.ndarray | None, depth: int) -> int:
    if tumour is not None and tumour.any():
        return int(np.argmax(tumour.reshape(depth, -1).sum(axis=1)))
    return depth // 2


def evaluate(models: Path | list[Path] | dict[str, Path], manifest: Path,
             groups: tuple[str, ...] = ("internal", "external"), device: str = "auto",
             progress: Callable[[str], None] | None = None) -> Evaluation:
    """Metrics for the manifest's patients in ``groups`` of the first model's split (all
    patients when it has none, see :func:`_split`), for each model (label -> checkpoint; one
    model is labelled 'model') and 'VCE = T1w'; with paired tests and one example slice per
    institution."""
    labelled = _labels(models)
    synthesizers = {label: synthesis.Synthesizer(
        path, synthesis.PipelineOptions(device=device, screen=False, confidence=False))
        for label, path in labelled.items()}
    entries = read_manifest(manifest)
    first = next(iter(labelled))
    split = _split(labelled[first], synthesizers[first].checkpoint, entries)
    rows: list[dict[str, object]] = []
    examples: list[Example] = []
    for entry in entries:
        group = _group(entry.patient, split) if split else "all"
        if split and group not in groups:
            continue
        t1 = synthesis.read_volume(entry.paths["t1w"])
        t2 = synthesis.read_volume(entry.paths["t2w"])
        ce = synthesis.resample_onto(synthesis.read_volume(entry.paths["ce"]), t1)
        tumour = _tumour(entry.paths.get("mask"), t1.image)
        predictions, on_grid = {}, {}
        head = None
        for label, synthesizer in synthesizers.items():
            result = synthesizer.run(t1, t2)
            if head is None:
                head = sitk.GetArrayFromImage(result.foreground) > 0
            predictions[label] = result.vce.array
            on_grid[label] = result.model_grid
        assert head is not None
        truth = np.where(head, ce.array, 0.0)
        predictions[BASELINE] = np.where(head, t1.array, 0.0)
        grid_head = synthesis.mask_to_model_grid(head)
        grid_truth = np.where(grid_head, synthesis.to_model_grid(ce.array).numpy(), 0.0)
        on_grid[BASELINE] = np.where(grid_head, synthesis.to_model_grid(t1.array).numpy(), 0.0)
        grid_tumour = None if tumour is None else synthesis.mask_to_model_grid(tumour)
        for name, prediction in predictions.items():
            acquired = study_metrics(truth, prediction, tumour)
            rows.append({"patient": entry.patient, "institution": entry.institution,
                         "group": group, "method": name,
                         **study_metrics(grid_truth, on_grid[name], grid_tumour),
                         **{ACQUIRED + k: v for k, v in acquired.items()}})
        if not any(e.institution == entry.institution for e in examples):
            k = _example_slice(tumour, truth.shape[0])
            t2_on_t1 = synthesis.resample_onto(t2, t1).array
            examples.append(Example(entry.patient, entry.institution, group,
                                    np.where(head, t1.array, 0.0)[k], t2_on_t1[k], truth[k],
                                    predictions[next(iter(labelled))][k]))
        if progress is not None:
            progress(entry.patient)
    tests = paired_tests(rows, TABLE) if rows else []
    return Evaluation(rows, summary_markdown(rows), tests, examples, labelled)


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
            values.append(f"{data.mean():.3g} +- {data.std():.2g}" if data.size else "n/a")
        lines.append(f"| {group} | {site} | {method} | {len(members)} | "
                     + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


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
    written["markdown"].write_text(
        evaluation.markdown + ("\nPaired tests (Wilcoxon signed-rank, two-sided):\n\n" + tests
                               if tests else ""))
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
    for label, model in evaluation.models.items():
        suffix = "" if len(evaluation.models) == 1 else f"-{label}"
        curves = training_curves(model.with_name("training_log.csv"),
                                 out / f"training-curves{suffix}.png")
        if curves is not None:
            images.append((f"training curves of {label} ({model})", curves))
    heading = ("Mean +- SD per institution (seed 000: L = 4095; seed 001: [0, 1]; on the "
               "model's 256 x 224 grid as the seeds, the last two columns on the acquired "
               "T1w grid, as delivered)")
    sections = [(heading, evaluation.markdown)]
    if tests:
        sections.append(("Paired tests (Wilcoxon signed-rank, two-sided)", tests))
    models = "\n".join(f"| {k} | {v} |" for k, v in evaluation.models.items())
    sections.insert(0, ("Models", "| label | checkpoint |\n|---|---|\n" + models))
    write_html(written["html"], "vcemri evaluation", sections, images)
    for _, path in images:
        written[path.stem] = path
    return written
