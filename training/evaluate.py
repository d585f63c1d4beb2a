"""Evaluating a model on a manifest: each patient through the synthesis pipeline (as
``process`` runs it), compared with the acquired CE-T1w on the T1w grid, next to the trivial
baseline 'VCE = T1w'; a table per institution, internal and external (from the run's
split.json), mean +- SD, written as CSV (per patient) and Markdown.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import synthesis

from .dataset import read_manifest
from .metrics import study_metrics

#: Columns of the summary table: (metric key, header).
TABLE = (
    ("seed000_whole_mae", "MAE"), ("seed000_whole_ssim", "SSIM"),
    ("seed000_whole_psnr", "PSNR"), ("seed000_tumour_mae", "tumour MAE"),
    ("seed001_whole_mae_x1000", "MAE x1e3 [0,1]"), ("seed001_whole_psnr", "PSNR [0,1]"),
)


@dataclass
class Evaluation:
    rows: list[dict[str, object]]
    markdown: str


def _group(patient: str, split: dict[str, list[str]]) -> str:
    for name in ("train", "internal", "external"):
        if patient in split.get(name, []):
            return name
    return "unlisted"


def _tumour(path: Path | None, reference: sitk.Image) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    mask = sitk.Resample(sitk.ReadImage(str(path)), reference, sitk.Transform(),
                         sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(mask) > 0


def evaluate(model: Path, manifest: Path, groups: tuple[str, ...] = ("internal", "external"),
             device: str = "auto",
             progress: Callable[[str], None] | None = None) -> Evaluation:
    """Metrics for the manifest's patients in ``groups`` (all patients when the model has no
    split.json beside it)."""
    split_path = Path(model).with_name("split.json")
    split = json.loads(split_path.read_text()) if split_path.is_file() else {}
    synthesizer = synthesis.Synthesizer(
        model, synthesis.PipelineOptions(device=device, screen=False, confidence=False))
    rows: list[dict[str, object]] = []
    for entry in read_manifest(manifest):
        group = _group(entry.patient, split) if split else "all"
        if split and group not in groups:
            continue
        t1 = synthesis.read_series(entry.paths["t1w"])
        t2 = synthesis.read_series(entry.paths["t2w"])
        ce = synthesis.resample_onto(synthesis.read_series(entry.paths["ce"]), t1)
        result = synthesizer.run(t1, t2)
        tumour = _tumour(entry.paths.get("mask"), t1.image)
        head = sitk.GetArrayFromImage(result.foreground) > 0
        truth = np.where(head, ce.array, 0.0)
        for name, prediction in (("model", result.vce.array),
                                 ("VCE = T1w", np.where(head, t1.array, 0.0))):
            rows.append({"patient": entry.patient, "institution": entry.institution,
                         "group": group, "method": name,
                         **study_metrics(truth, prediction, tumour)})
        if progress is not None:
            progress(entry.patient)
    return Evaluation(rows, summary_markdown(rows))


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


def write(evaluation: Evaluation, out: Path) -> tuple[Path, Path]:
    """``evaluation.csv`` (every patient and method) and ``evaluation.md`` (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    table = out / "evaluation.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(evaluation.rows[0]))
        writer.writeheader()
        writer.writerows(evaluation.rows)
    markdown = out / "evaluation.md"
    markdown.write_text(evaluation.markdown)
    return table, markdown
