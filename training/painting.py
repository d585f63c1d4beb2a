"""Seed 002's CG-SAMR as a second augmentation source: a trained painter
(``vcemri train --architecture cgsamr``, training/cgsamr.py) paints edited tumours (moved,
grown, shrunk, made necrotic; training/lesion_maps.py) into the training slices of a VCE
model (``vcemri train --paint MODEL``), T1w, T2w and CE-T1w at once, so the three stay one
lesion.

A painter's checkpoint is a safetensors file of the CG-SAMR generator's weights whose
metadata (``vcemri-painter``) holds its configuration, the cache normalization its units
are in, and how it was trained. The node never loads one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import synthesis
from config import InputError

from . import lesion_maps
from .dataset import PatientEntry, SliceCache, grid_tumour_masks

#: The metadata key of a painter checkpoint.
PAINTER_KEY = "vcemri-painter"
#: The painter's window on a slice (pixels, a multiple of 16): what it is trained on, and the
#: least it paints in (a larger region gets a larger window).
WINDOW = 96


def save_painter(path: Path, generator: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Write the painter's weights and ``meta`` (configuration, normalization, training)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    save_file(state, str(path), metadata={PAINTER_KEY: json.dumps(
        {"architecture": "cgsamr", "config": generator.config, **meta})})
    return path


def load_painter(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(CG-SAMR generator in eval mode, its metadata); InputError when ``path`` is not a
    painter's checkpoint."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--paint {path}: no such file")
    try:
        with safe_open(str(path), "pt") as handle:
            text = (handle.metadata() or {}).get(PAINTER_KEY)
    except (SafetensorError, OSError) as exc:
        raise InputError(f"--paint {path}: not a safetensors checkpoint ({exc})") from None
    if text is None:
        raise InputError(f"--paint {path}: not a CG-SAMR painter (train one with vcemri train "
                         "--architecture cgsamr)")
    meta = json.loads(text)
    generator = synthesis.build_model("cgsamr", **meta["config"])
    generator.load_state_dict(load_file(str(path)))
    return generator.eval(), meta


def head_of(t1w: np.ndarray) -> np.ndarray:
    """A cache slice's head: the pipeline zeroes the background before normalising, so it is
    the slice's minimum value."""
    return t1w > float(t1w.min()) + 1e-3


def _window(region: np.ndarray) -> tuple[slice, slice]:
    """A window holding ``region``: at least :data:`WINDOW` square, a multiple of 16, inside
    the slice."""
    rows, cols = np.nonzero(region)
    out = []
    for found, size in ((rows, region.shape[0]), (cols, region.shape[1])):
        extent = int(found.max() - found.min() + 1) + 16
        span = min(size - size % 4, max(WINDOW, -(-extent // 16) * 16))
        start = int(np.clip((found.min() + found.max() + 1) // 2 - span // 2, 0, size - span))
        out.append(slice(start, start + span))
    return out[0], out[1]


def painter_input(labels: np.ndarray, region: np.ndarray, images: np.ndarray) -> np.ndarray:
    """CG-SAMR's input (levels + 1 + sequences, H, W): the lesion's one-hot levels, the region,
    and the prior: ``images`` (sequences, H, W) blanked (0) in the region."""
    return np.concatenate([lesion_maps.one_hot(labels), region[None].astype(np.float32),
                           images * (~region)[None]]).astype(np.float32)


def lesion_labels(cache: SliceCache, masks: np.ndarray, rows: np.ndarray
                  ) -> dict[int, np.ndarray]:
    """The label map (seed 004's levels of the CE-T1w) of each of ``rows`` whose tumour mask
    (``masks``, every cache row's, :func:`grid_tumour_masks`) holds a lesion of at least
    :data:`lesion_maps.MIN_PIXELS` pixels."""
    return {row: lesion_maps.quantise(np.asarray(cache.targets[row], np.float32), masks[row])
            for row in map(int, rows) if masks[row].sum() >= lesion_maps.MIN_PIXELS}


@dataclass(frozen=True)
class Painted:
    """One painted slice: its inputs (C, H, W), target (H, W), the edit made and the region
    painted (H, W; the blending reaches :data:`lesion_maps.BLEND_REACH_PX` beyond it)."""

    inputs: np.ndarray
    target: np.ndarray
    edit: str
    region: np.ndarray


class Painter:
    """Paints edited lesions into training slices (see the module). ``probability``: of a
    lesion slice being repainted; the draws depend on (seed, key) only."""

    def __init__(self, path: Path, probability: float, seed: int) -> None:
        self.generator, self.meta = load_painter(path)
        self.path, self.probability, self.seed = Path(path), probability, seed
        self.labels: dict[int, np.ndarray] = {}

    def prepare(self, cache: SliceCache, entries: list[PatientEntry], rows: np.ndarray) -> int:
        """Find the lesion slices among ``rows`` of ``cache`` and quantise their lesions
        (the manifest's tumour masks, seed 004's levels); returns how many there are."""
        if cache.roles[:2] != ("t1w", "t2w") or len(cache.roles) != 2:
            raise InputError(f"--paint paints T1w, T2w and CE-T1w; this model also reads "
                             f"{', '.join(cache.roles[2:])}")
        if cache.normalization != self.meta.get("normalization"):
            raise InputError(f"--paint {self.path}: its images are in "
                             f"{self.meta.get('normalization')} units, this run's in "
                             f"{cache.normalization}; train the painter with the same "
                             "--normalization")
        self.labels = lesion_labels(cache, grid_tumour_masks(entries, cache), rows)
        return len(self.labels)

    @torch.no_grad()
    def paint(self, inputs: np.ndarray, target: np.ndarray, labels: np.ndarray,
              rng: np.random.Generator, edit: lesion_maps.Edit | None = None
              ) -> Painted | None:
        """``inputs`` (T1w, T2w; H, W) and ``target`` with the lesion ``labels`` edited and
        painted in; None when no edit fits in the head."""
        head = head_of(inputs[0])
        edited = lesion_maps.edit_lesion(labels, head, rng, edit)
        if edited is None:
            return None
        rows, cols = _window(edited.region)
        images = np.concatenate([inputs, target[None]])[:, rows, cols].astype(np.float32)
        x = painter_input(edited.labels[rows, cols], edited.region[rows, cols], images)
        painted = self.generator(torch.from_numpy(x)[None])[0][0].numpy()
        weight = lesion_maps.blend_weight(edited.region[rows, cols])
        inside = head[rows, cols]
        mixed = np.where(inside, images * (1.0 - weight) + painted * weight, images)
        out_inputs, out_target = inputs.copy(), target.copy()
        out_inputs[:, rows, cols] = mixed[:2]
        out_target[rows, cols] = mixed[2]
        return Painted(out_inputs, out_target, edited.edit, edited.region)

    def batch(self, rows: np.ndarray, inputs: np.ndarray, targets: np.ndarray,
              epoch: int) -> tuple[np.ndarray, np.ndarray, int]:
        """A batch of whole slices (B, C, H, W), (B, H, W) of cache ``rows`` with some lesion
        slices repainted (draws seeded by (seed, epoch, row)); the number painted."""
        inputs, targets, count = inputs.copy(), targets.copy(), 0
        for b, row in enumerate(map(int, rows)):
            labels = self.labels.get(row)
            rng = np.random.default_rng([self.seed, epoch, row, 29])
            if labels is None or rng.random() >= self.probability:
                continue
            done = self.paint(inputs[b], targets[b], labels, rng)
            if done is not None:
                inputs[b], targets[b], count = done.inputs, done.target, count + 1
        return inputs, targets, count
