"""How well does a CG-SAMR painter paint a lesion it has never seen? Seed 002's generator
(``vcemri train --architecture cgsamr``) on its own split's internal patients.

    python benchmarks/painting.py PAINTER MANIFEST [--figure painted.png]

For every lesion slice of the painter's internal patients (``split.json`` beside it; lesions
of at least ``lesion_maps.MIN_PIXELS`` pixels on the model grid), the lesion and 4 pixels
around it are blanked and painted back from the lesion's own label map (seed 004's levels).
Printed per sequence (T1w, T2w, CE-T1w; normalised units, i.e. SDs of the patient's T1w or
T2w inside the head), medians over slices:

- the mean absolute error inside the lesion, of the painter and of two references: the
  region filled with the mean of the ring of tissue around it (a painter that knows nothing
  of the lesion) and the painter given an empty label map (how much the label map steers it);
- the lesion's contrast (mean lesion - mean surrounding ring), painted against real.

``--figure`` saves examples of the four edits (moved, grown, shrunk, necrotic).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from benchmarks.machine import describe

SEQUENCES = ("T1w", "T2w", "CE-T1w")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("painter", type=Path)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--figure", type=Path, default=None)
    args = parser.parse_args()

    import torch

    import synthesis
    from training import lesion_maps
    from training.dataset import prepare, read_manifest
    from training.painting import Painter, head_of, painter_input

    print(describe(("numpy", "torch")))
    painter = Painter(args.painter, probability=1.0, seed=0)
    split = json.loads((args.painter.parent / "split.json").read_text())
    entries = [e for e in read_manifest(args.manifest) if e.patient in set(split["internal"])]
    if not entries:
        print("the painter's split has no internal patients in this manifest")
        return 1
    method, level = painter.meta["normalization"].values()
    with tempfile.TemporaryDirectory() as folder:
        cache = prepare(entries, Path(folder), synthesis.Normalization(method, level))
        painter.prepare(cache, entries, np.arange(len(cache.targets)))
        errors = {name: [[] for _ in SEQUENCES] for name in ("painter", "ring", "empty")}
        contrast: list[list[tuple[float, float]]] = [[] for _ in SEQUENCES]
        rows = sorted(painter.labels)
        for row in rows:
            target = np.asarray(cache.targets[row], np.float32)
            images = np.concatenate([np.asarray(cache.inputs[row], np.float32), target[None]])
            labels = painter.labels[row]
            lesion = labels > 0
            region = lesion_maps.dilate(lesion, lesion_maps.MARGIN_PX)
            ring = lesion_maps.dilate(region, 3) & ~region & head_of(images[0])
            with torch.no_grad():
                painted = painter.generator(torch.from_numpy(painter_input(
                    labels, region, images))[None])[0][0].numpy()
                empty = painter.generator(torch.from_numpy(painter_input(
                    np.zeros_like(labels), region, images))[None])[0][0].numpy()
            for k in range(len(SEQUENCES)):
                real = images[k][lesion]
                errors["painter"][k].append(float(np.abs(painted[k][lesion] - real).mean()))
                errors["empty"][k].append(float(np.abs(empty[k][lesion] - real).mean()))
                surround = float(images[k][ring].mean()) if ring.any() else 0.0
                errors["ring"][k].append(float(np.abs(surround - real).mean()))
                contrast[k].append((float(painted[k][lesion].mean()) - surround,
                                    float(real.mean()) - surround))
        if args.figure is not None:
            _figure(painter, cache, args.figure)
    print(f"painter: {args.painter} ({painter.meta['training'].get('steps')} steps, "
          f"{painter.meta['training'].get('seconds')} s of training)")
    print(f"{len(rows)} lesion slices of {len(entries)} internal patients")
    print("median MAE inside the lesion (normalised units): painter / ring mean / painter "
          "with an empty label map; lesion contrast (lesion - ring), painted / real")
    for k, name in enumerate(SEQUENCES):
        painted_c = statistics.median(c[0] for c in contrast[k])
        real_c = statistics.median(c[1] for c in contrast[k])
        agree = np.corrcoef(np.array(contrast[k]).T)[0, 1]
        print(f"  {name:7} {statistics.median(errors['painter'][k]):.3f} / "
              f"{statistics.median(errors['ring'][k]):.3f} / "
              f"{statistics.median(errors['empty'][k]):.3f}   contrast {painted_c:+.2f} / "
              f"{real_c:+.2f} (correlation over slices {agree:.2f})")
    return 0


def _figure(painter, cache, path: Path) -> None:  # noqa: ANN001
    """Examples of the four edits on the painter's largest internal lesions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training import lesion_maps

    largest = sorted(painter.labels, key=lambda r: -(painter.labels[r] > 0).sum())[:3]
    figure, axes = plt.subplots(len(largest), len(lesion_maps.EDITS) + 1, squeeze=False,
                                figsize=(2.4 * (len(lesion_maps.EDITS) + 1), 2.4 * len(largest)))
    for i, row in enumerate(largest):
        inputs = np.asarray(cache.inputs[row], np.float32)
        target = np.asarray(cache.targets[row], np.float32)
        centre = np.argwhere(painter.labels[row] > 0).mean(0).astype(int)
        window = tuple(slice(max(int(c) - 40, 0), int(c) + 40) for c in centre)
        axes[i, 0].imshow(target[window], cmap="gray", vmin=-1, vmax=4)
        axes[i, 0].set_title("CE-T1w as acquired", fontsize=8)
        for j, edit in enumerate(lesion_maps.EDITS, start=1):
            done = painter.paint(inputs, target, painter.labels[row],
                                 np.random.default_rng(row), edit)
            if done is not None:
                axes[i, j].imshow(done.target[window], cmap="gray", vmin=-1, vmax=4)
            axes[i, j].set_title(f"{edit}, painted", fontsize=8)
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    print(f"figure: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
