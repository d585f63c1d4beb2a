"""Does the confidence map tell where the synthesis is wrong? Measured against the acquired
CE-T1w, per patient and per site, as the node delivers the VCE (the T1w grid, inside the
head):

- the Spearman correlation between (1 - confidence) and |VCE - CE| per pixel;
- the AUROC of (1 - confidence) for "error above the site's 90th percentile";
- the tumour's excess contrast (mean tumour / mean other head tissue - 1) of the VCE against
  the CE-T1w's, and where it is off by more than :data:`WRONG_ENHANCEMENT` (30 %), the share of
  the tumour the low-confidence helper covers (planning.helper_regions, as delivered);
- the share of the head that helper covers (a helper that covers the whole head would cover
  every tumour and tell nothing);
- a reliability curve: the mean actual error per confidence bin next to what the confidence
  says (synthesis.inference: confidence c stands for an error of T (1 - c) / c);
- how often the actual error exceeds that stated error: about 1 - q for a head refitted to
  the q-quantile of the error (``vcemri refit-confidence --quantile q``; 30 % for the default
  0.7), about e^-1 = 37 % for an expected error of Laplace-distributed errors, and below
  either where the mirrored passes' disagreement (the other estimate) is the larger.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

#: Relative error of the tumour's excess contrast above which its enhancement is wrong.
WRONG_ENHANCEMENT = 0.3
#: Pixels kept per patient for the site-level figures.
SAMPLE = 20000
BINS = np.linspace(0.0, 1.0, 11)


def excess_contrast(image: np.ndarray, tumour: np.ndarray, head: np.ndarray) -> float:
    """mean(tumour) / mean(other head tissue) - 1."""
    other = head & ~tumour
    if not tumour.any() or not other.any():
        return float("nan")
    return float(image[tumour].mean() / max(float(image[other].mean()), 1e-6) - 1.0)


@dataclass
class PatientReliability:
    """One patient's figures, and a sample of its (confidence, error) pixels."""

    metrics: dict[str, float]
    confidence: np.ndarray = field(repr=False)
    error: np.ndarray = field(repr=False)


def patient_reliability(result: Any, truth: np.ndarray, head: np.ndarray,
                        tumour: np.ndarray | None, seed: int = 0) -> PatientReliability | None:
    """The figures of one synthesis result (``truth``: the CE-T1w on the T1w grid); None
    when the result has no confidence map."""
    from scipy.stats import spearmanr

    import planning
    from config import PlanningSettings

    if result.confidence is None or result.confidence_unit is None:
        return None
    confidence = sitk.GetArrayFromImage(result.confidence)[head]
    vce = result.vce.array
    error = np.abs(vce - truth)[head] / result.confidence_unit
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(error), min(SAMPLE, len(error)), replace=False)
    spearman = float(spearmanr(1.0 - confidence[pick], error[pick]).statistic)
    helpers, _ = planning.helper_regions(result, PlanningSettings())
    low = next((h.mask for h in helpers if h.name.endswith("LowConfidence")),
               np.zeros(head.shape, bool))
    metrics = {"confidence_spearman": spearman, "tumour_excess_error": float("nan"),
               "tumour_low_confidence_share": float("nan"),
               "low_confidence_head_share": float((low & head).sum() / max(head.sum(), 1))}
    if tumour is not None and tumour.any():
        wanted, made = excess_contrast(truth, tumour, head), excess_contrast(vce, tumour, head)
        metrics["tumour_excess_error"] = abs(made - wanted) / max(abs(wanted), 1e-6)
        metrics["tumour_low_confidence_share"] = float((low & tumour).sum() / tumour.sum())
    return PatientReliability(metrics, confidence[pick], error[pick])


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(a positive pixel scores above a negative one), ties half (Mann-Whitney, by ranks)."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def site_reliability(patients: list[tuple[str, str, str, PatientReliability]]
                     ) -> list[dict[str, Any]]:
    """Per (model, group, site) of ``patients`` (model, group, site, figures): pooled
    Spearman, AUROC for the site's top-10 % errors, the tumours whose enhancement is wrong and
    how many the low-confidence helper covers by half, the median share of the head it
    covers, and the reliability curve."""
    from scipy.stats import spearmanr

    from synthesis import stated_error

    by_site: dict[tuple[str, str, str], list[PatientReliability]] = defaultdict(list)
    for model, group, site, reliability in patients:
        by_site[(model, group, site)].append(reliability)
    order = list(dict.fromkeys(model for model, _, _, _ in patients))
    rows = []
    for (model, group, site), members in sorted(by_site.items(),
                                                key=lambda kv: (order.index(kv[0][0]),
                                                                kv[0][1:])):
        confidence = np.concatenate([m.confidence for m in members])
        error = np.concatenate([m.error for m in members])
        wrong = [m for m in members if m.metrics["tumour_excess_error"] > WRONG_ENHANCEMENT]
        covered = [m for m in wrong if m.metrics["tumour_low_confidence_share"] >= 0.5]
        index = np.digitize(confidence, BINS[1:-1])
        curve = [(float(confidence[index == b].mean()), float(error[index == b].mean()),
                  int((index == b).sum())) for b in range(len(BINS) - 1) if (index == b).any()]
        rows.append({
            "model": model, "group": group, "institution": site, "patients": len(members),
            "spearman": float(spearmanr(1.0 - confidence, error).statistic),
            "auroc_top10": auroc(1.0 - confidence, error > np.quantile(error, 0.9)),
            "above_stated_percent": 100.0 * float(np.mean(error > stated_error(confidence))),
            "tumours_wrong": len(wrong), "tumours_wrong_covered": len(covered),
            "head_flagged_percent": 100.0 * float(np.median(
                [m.metrics["low_confidence_head_share"] for m in members])),
            "curve": curve})
    return rows


def reliability_markdown(rows: list[dict[str, Any]]) -> str:
    """The per-site table."""
    lines = ["| model | group | institution | n | Spearman (1 - c, error) | AUROC top 10 % "
             "errors | pixels above the error c states (%) | tumours with enhancement off "
             "> 30 % | of them >= half covered by the low-confidence helper | head in that "
             "helper (median %) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['group']} | {r['institution']} | {r['patients']} | "
                     f"{r['spearman']:.2f} | {r['auroc_top10']:.2f} | "
                     f"{r['above_stated_percent']:.0f} | {r['tumours_wrong']} | "
                     f"{r['tumours_wrong_covered']} | {r['head_flagged_percent']:.1f} |")
    return "\n".join(lines) + "\n"


def reliability_figure(rows: list[dict[str, Any]], path: Path, tolerance: float) -> Path:
    """Mean actual error per confidence bin for each site, next to what the confidence says
    (``tolerance`` (1 - c) / c, synthesis.inference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.5), dpi=110)
    c = np.linspace(0.05, 1.0, 100)
    axis.plot(c, tolerance * (1 - c) / c, "k--", label="what confidence c says: T (1 - c) / c")
    for r in rows:
        if r["curve"]:
            x, y, _ = zip(*r["curve"], strict=True)
            axis.plot(x, y, "o-", ms=3,
                      label=f"{r['model']}: {r['institution']} ({r['group']})")
    axis.set_xlabel("confidence")
    axis.set_ylabel("mean |VCE - CE| (T1w head SDs)")
    axis.set_ylim(0, 2.0)
    axis.legend(fontsize=7)
    axis.set_title("reliability of the confidence map")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
