"""What the model grid costs: the acquired CE-T1w taken to the seeds' 256 x 224 grid and back
(the way every delivered VCE travels), per site, with the way back the pipeline uses (an
interpolating cubic B-spline) and with bilinear, and through a fixed pixel spacing's canvas
(``vcemri train --spacing-mm``, the same way back); and how exactly each way back restores a
smooth pattern.

    python benchmarks/resampling.py [--patients 2] [--slices 16] [--seed 5] [--spacing-mm 0.8]

Prints the machine, then per site the head SSIM (L = 4095) and MAE of the round trip against
the acquired CE-T1w itself, next to 'VCE = T1w' (the copied T1w), and last the error of each
way back on a smooth pattern (10 periods across the field, 256 x 224 -> 320 x 320). A round
trip is the ceiling of what a model on that grid can deliver: no output restores detail the
grid lost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import describe
from simulation import SITES, SimulationOptions, simulate_cohort
from synthesis import foreground, read_series, resample_onto, to_model_grid
from synthesis.preprocess import GridPolicy, from_canvas, from_model_grid, to_canvas
from training.metrics import L_SEED000, study_metrics


def bilinear_back(slices: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The way back a bilinear resampling would take (for comparison only)."""
    return F.interpolate(torch.as_tensor(slices)[:, None], size=(rows, columns),
                         mode="bilinear", align_corners=False)[:, 0].numpy()


def smooth_pattern_errors(rows: int = 320, columns: int = 320) -> dict[str, float]:
    """RMS error of each way back from the model grid to ``rows`` x ``columns`` on a smooth
    pattern (10 periods across the field of view, sampled at both grids' pixel centres; the
    pattern tests/test_preprocess.py uses), inside a 4-pixel border."""
    def pattern(r: int, c: int) -> np.ndarray:
        y, x = (np.arange(r) + 0.5) / r, (np.arange(c) + 0.5) / c
        return (np.sin(2 * np.pi * 10 * x)[None] * np.cos(2 * np.pi * 10 * y)[:, None]
                ).astype(np.float32)[None]

    model, truth = pattern(256, 224), pattern(rows, columns)
    ways = {
        "cubic B-spline (the pipeline)": from_model_grid(model, rows, columns).numpy(),
        "bilinear": bilinear_back(model, rows, columns),
        "bicubic (torch, Keys a = -0.75)": F.interpolate(
            torch.as_tensor(model)[:, None], size=(rows, columns), mode="bicubic",
            align_corners=False)[:, 0].numpy(),
    }
    inner = (slice(None), slice(4, -4), slice(4, -4))
    return {name: float(np.sqrt(np.mean((way - truth)[inner] ** 2)))
            for name, way in ways.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--spacing-mm", type=float, default=0.8,
                        help="the fixed pixel spacing whose round trip is measured beside")
    args = parser.parse_args()
    spaced = GridPolicy(256, 224, args.spacing_mm)
    print(describe(("numpy", "torch", "SimpleITK")))
    print(f"the CE-T1w to 256 x 224 and back, against itself; head region, L = {L_SEED000:g}; "
          f"median of {args.patients} patients per site")
    mm = f"{args.spacing_mm:g} mm"
    print(f"{'site':<6} {'matrix':>9} {'SSIM B-spline':>14} {'SSIM bilinear':>14} "
          f"{'SSIM ' + mm:>14} {'SSIM T1w copy':>14} {'MAE B-spline':>13} "
          f"{'MAE bilinear':>13} {'MAE ' + mm:>13}")
    with tempfile.TemporaryDirectory() as tmp:
        simulate_cohort(Path(tmp), SimulationOptions(
            patients_per_institution=args.patients, seed=args.seed, slices=args.slices),
            workers=2)
        for key, site in SITES.items():
            figures: dict[str, list[float]] = {}
            for n in range(1, args.patients + 1):
                folder = Path(tmp) / key / f"{key}-{n:03d}"
                t1w = read_series(folder / "t1w")
                ce = resample_onto(read_series(folder / "ce"), t1w).array
                head = foreground(t1w.array)
                rows, columns = ce.shape[1:]
                grid = to_model_grid(ce).numpy()
                spacing = t1w.image.GetSpacing()
                placement = spaced.place(ce.shape, (spacing[1], spacing[0]))
                canvas = to_canvas(ce, placement).numpy()
                for name, back in (("bspline", from_model_grid(grid, rows, columns).numpy()),
                                   ("bilinear", bilinear_back(grid, rows, columns)),
                                   ("spaced", from_canvas(canvas, placement).numpy()),
                                   ("copy", t1w.array)):
                    values = study_metrics(np.where(head, ce, 0), np.where(head, back, 0),
                                           None, head)
                    figures.setdefault(f"ssim_{name}", []).append(values["seed000_head_ssim"])
                    figures.setdefault(f"mae_{name}", []).append(values["seed000_head_mae"])
            m = {k: statistics.median(v) for k, v in figures.items()}
            matrix = f"{site.grid.rows}x{site.grid.columns}"
            print(f"{key:<6} {matrix:>9} {m['ssim_bspline']:>14.4f} {m['ssim_bilinear']:>14.4f} "
                  f"{m['ssim_spaced']:>14.4f} {m['ssim_copy']:>14.4f} {m['mae_bspline']:>13.2f} "
                  f"{m['mae_bilinear']:>13.2f} {m['mae_spaced']:>13.2f}")
    print("a smooth pattern (10 periods across the field), 256 x 224 -> 320 x 320, RMS error "
          "of each way back:")
    errors = smooth_pattern_errors()
    reference = errors["cubic B-spline (the pipeline)"]
    for name, error in errors.items():
        print(f"  {name:<32} {error:.2e}  ({error / reference:.0f}x the B-spline's)")


if __name__ == "__main__":
    main()
