"""The evaluation report: paired significance tests, figures and one HTML page.

- Paired tests: for every metric and group, each model against 'VCE = T1w' and against every
  other model, Wilcoxon signed-rank on the per-patient values (scipy; two-sided). The seeds
  report paired comparisons without naming the test; Wilcoxon makes no normality assumption,
  which a few patients per institution cannot support.
- Figures like seed 000 FIG. 3 and FIG. 9: for one patient per institution, the T1w, T2w, real
  CE-T1w, VCE and the absolute difference |VCE - CE| after scaling to [0, 1] (seed 001), shown
  on a [0, 0.2] colour scale; plus the training curves from ``training_log.csv``.
"""

from __future__ import annotations

import csv
import html
import itertools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BASELINE = "VCE = T1w"


@dataclass
class Example:
    """One slice of one patient for the figures (T1w grid, scanner units)."""

    patient: str
    institution: str
    group: str
    t1w: np.ndarray
    t2w: np.ndarray
    ce: np.ndarray
    vce: np.ndarray


def paired_tests(rows: list[dict[str, object]], metrics: tuple[tuple[str, str], ...]
                 ) -> list[dict[str, object]]:
    """Wilcoxon signed-rank p-values between methods, per group and metric (patients paired)."""
    from scipy.stats import wilcoxon

    values: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for row in rows:
        for key, _ in metrics:
            values[(str(row["group"]), str(row["method"]), key)][str(row["patient"])] = float(
                row[key])  # type: ignore[arg-type]
    groups = sorted({str(r["group"]) for r in rows})
    methods = sorted({str(r["method"]) for r in rows} - {BASELINE})
    pairs = [(m, BASELINE) for m in methods] + list(itertools.combinations(methods, 2))
    results = []
    for group, (a, b), (key, header) in itertools.product(groups, pairs, metrics):
        left, right = values[(group, a, key)], values[(group, b, key)]
        patients = sorted(p for p in set(left) & set(right)
                          if np.isfinite(left[p]) and np.isfinite(right[p]))
        x = np.array([left[p] for p in patients])
        y = np.array([right[p] for p in patients])
        if len(patients) < 2 or np.allclose(x, y):
            p_value = float("nan")
        else:
            p_value = float(wilcoxon(x, y, zero_method="zsplit").pvalue)
        results.append({"group": group, "method": a, "versus": b, "metric": header,
                        "n": len(patients),
                        "mean_difference": float(np.mean(x - y)) if patients else float("nan"),
                        "p_value": p_value})
    return results


#: Below this many pairs the exact two-sided Wilcoxon p-value cannot fall below 0.05, whatever
#: the data: its smallest value is 2 / 2^n (n = 5: 0.0625).
FEW_PAIRS = 6


def _p(value: float, n: int) -> str:
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.3g}" + (f" (n < {FEW_PAIRS}: >= {2 / 2**n:.3g} whatever the data)"
                             if n < FEW_PAIRS else "")


def tests_markdown(tests: list[dict[str, object]]) -> str:
    lines = ["| group | method | versus | metric | n | mean difference | p (Wilcoxon) |",
             "|---|---|---|---|---|---|---|"]
    for t in tests:
        p = float(t["p_value"])  # type: ignore[arg-type]
        lines.append(f"| {t['group']} | {t['method']} | {t['versus']} | {t['metric']} | "
                     f"{t['n']} | {float(t['mean_difference']):.4g} | "  # type: ignore[arg-type]
                     f"{_p(p, int(t['n']))} |")  # type: ignore[call-overload]
    return "\n".join(lines) + "\n"


def example_figure(example: Example, path: Path) -> Path:
    """T1w | T2w | real CE | VCE | |VCE - CE| in [0, 0.2] for one slice (FIG. 3/9-like)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low = float(min(example.ce.min(), example.vce.min()))
    high = float(max(example.ce.max(), example.vce.max()))
    scale = max(high - low, 1e-6)
    difference = np.abs(example.vce - example.ce) / scale
    figure, axes = plt.subplots(1, 5, figsize=(15, 3.4))
    panels = [("T1w", example.t1w, "gray", None), ("T2w", example.t2w, "gray", None),
              ("real CE-T1w", example.ce, "gray", (low, high)),
              ("VCE (synthetic)", example.vce, "gray", (low, high)),
              ("|VCE - CE| [0, 0.2]", difference, "jet", (0.0, 0.2))]
    for axis, (title, image, colours, window) in zip(axes, panels):
        shown = axis.imshow(image, cmap=colours, vmin=window[0] if window else None,
                            vmax=window[1] if window else None)
        axis.set_title(title, fontsize=10)
        axis.axis("off")
    figure.colorbar(shown, ax=axes[-1], fraction=0.046, pad=0.04)
    figure.suptitle(f"{example.institution} ({example.group}), patient {example.patient}",
                    fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def training_curves(log: Path, path: Path) -> Path | None:
    """L1 (CycleGAN: cycle-consistency L1) and adversarial losses against the step (running
    mean over 25 steps)."""
    if not log.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return None
    steps = np.array([int(r["step"]) for r in rows])
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    reconstruction = "loss_cycle" if "loss_cycle" in rows[0] else "loss_l1"
    for axis, keys in zip(axes, ((reconstruction,), ("loss_adv", "loss_d"))):
        for key in keys:
            values = np.array([float(r[key]) for r in rows])
            window = min(25, len(values))
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(steps, values, alpha=0.25)
            axis.plot(steps[window - 1:], smooth, label=key)
        axis.set_xlabel("step")
        axis.legend()
    axes[0].set_title("cycle L1 (normalized units)" if reconstruction == "loss_cycle"
                      else "L1 (normalized units)")
    axes[1].set_title("least-squares GAN losses")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _table(markdown: str) -> str:
    lines = [line for line in markdown.strip().splitlines() if line.startswith("|")]
    if len(lines) < 2:
        return ""
    cells = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in lines]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(path: Path, title: str, sections: list[tuple[str, str]],
               images: list[tuple[str, Path]]) -> Path:
    """A self-contained page (images referenced beside it): Markdown tables become tables."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             "</title><style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
             "td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}"
             "th{background:#eee}img{max-width:100%;margin:0.5em 0}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             "<p><b>Research software, not a medical device.</b> Synthetic images are not "
             "contrast-enhanced scans.</p>"]
    for heading, markdown in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        table = _table(markdown)
        parts.append(table or f"<pre>{html.escape(markdown)}</pre>")
    for caption, image in images:
        parts.append(f"<figure><img src='{html.escape(image.name)}' alt='"
                     f"{html.escape(caption)}'><figcaption>{html.escape(caption)}</figcaption>"
                     "</figure>")
    parts.append("</body></html>")
    path.write_text("\n".join(parts))
    return path
