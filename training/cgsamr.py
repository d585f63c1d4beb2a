"""Training seed 002's CG-SAMR as a lesion painter (``vcemri train --architecture cgsamr``).

From the training patients' lesion slices (the manifest's tumour masks; the split is the one
``vcemri train`` draws with the same seed and institutions, so a painter never sees a VCE
model's internal or external test patients): windows of :data:`painting.WINDOW` pixels around
a lesion, its seed-004 levels as the label map, and a region (the lesion grown by 4-8 pixels,
half the time with a lesion-free disc beside it, which teaches the painter the normal tissue
a moved lesion leaves behind) blanked in the T1w, T2w and CE-T1w prior.

The objective is seed 002's eq. 6, min over G and U, max over D of
L_GAN + 5 L_FM + L_SC + L_CM (lambda_1..3 = 5, 1, 1, section IV-B):

- L_GAN, least squares, over label-wise discriminators (PatchGAN, ``synthesis/models/
  discriminator.py``), one per region of interest (the lesion; the rest of the painted region;
  the seed's third, background, is never painted here) and scale (full and half), each seeing
  its region's input and T1w, T2w and CE-T1w masked by it (the seed's x' = m_k x, y' = m_k y);
- L_FM, pix2pixHD's feature matching over every discriminator layer;
- L_SC = GDL(s, U(y)) + GDL(s, U(G(x))) (eq. 5): a U-Net segmenter (``synthesis/models/
  unet.py``) of the lesion levels from the three images, trained with the generator, so a
  painted lesion must show the levels it was asked for (generalised Dice, Sudre et al. 2017);
- L_CM, CG-SAMR's confidence loss on each branch's half-resolution image (eq. 1,
  ``training/objectives.py``), lambda 0.1 then 0.03.

Added to the seed's objective: an L1 term on the painted region, weight 10, because minutes of
CPU training do not bring an adversarial objective alone to the region's intensities (the
seed trains 500 epochs on a GPU). Adam 2e-4, betas (0.5, 0.999), as the seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import synthesis
from config import InputError

from . import lesion_maps
from .dataset import prepare, read_manifest
from .objectives import ConfidenceRegularizer, confidence_loss
from .painting import WINDOW, head_of, lesion_labels, painter_input, save_painter

#: Seed 002 eq. 6 (section IV-B): feature matching, shape consistency, confidence map.
FM_WEIGHT, SC_WEIGHT, CM_WEIGHT = 5.0, 1.0, 1.0
#: Our addition (see the module docstring).
L1_WEIGHT = 10.0


@dataclass(frozen=True)
class PainterOptions:
    """How to train a painter (``vcemri train --architecture cgsamr``)."""

    institutions: tuple[str, ...] | None = None
    steps: int = 1000
    batch_size: int = 8
    width: float = 0.25
    seed: int = 0
    learning_rate: float = 2e-4
    internal_fraction: float = 0.3
    normalization: str = "zscore-patient"
    split: str | None = None


def generalised_dice(target: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """Generalised Dice loss (Sudre et al. 2017, seed 002 eq. 4): 1 - 2 sum_l w_l sum r s /
    sum_l w_l sum (r + s), w_l = 1 / (sum r)^2, over one-hot ``target`` and softmax
    ``probabilities`` (B, L, H, W)."""
    r, s = target.float(), probabilities.float()
    weight = 1.0 / r.sum((0, 2, 3)).clamp_min(1.0) ** 2
    overlap = (weight * (r * s).sum((0, 2, 3))).sum()
    total = (weight * (r + s).sum((0, 2, 3))).sum()
    return 1.0 - 2.0 * overlap / total.clamp_min(1e-8)


def _layers(discriminator: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """A PatchGAN's activations after each LeakyReLU, then its scores (for L_FM)."""
    out = []
    for layer in discriminator.net:
        x = layer(x)
        if isinstance(layer, torch.nn.LeakyReLU) or layer is discriminator.net[-1]:
            out.append(x)
    return out


class _Windows:
    """Training windows around the training patients' lesions (see the module)."""

    def __init__(self, cache: Any, labels: dict[int, np.ndarray], seed: int) -> None:
        """``labels``: the lesion label map of each usable row (:func:`lesion_labels`)."""
        if not labels:
            raise InputError("no training patient has a tumour mask with a lesion of at least "
                             f"{lesion_maps.MIN_PIXELS} pixels on a slice: CG-SAMR learns "
                             "lesions from the manifest's masks")
        self.cache, self.labels, self.seed = cache, labels, seed
        self.rows = sorted(labels)

    def batch(self, step: int, size: int) -> tuple[np.ndarray, ...]:
        rng = np.random.default_rng([self.seed, step, 31])
        xs, ys, labels, regions = [], [], [], []
        for row in rng.choice(self.rows, size):
            label = self.labels[row]
            mask = label > 0
            images = np.concatenate([np.asarray(self.cache.inputs[row][:2], np.float32),
                                     np.asarray(self.cache.targets[row], np.float32)[None]])
            region = lesion_maps.dilate(mask, int(rng.integers(4, 9)))
            found = np.argwhere(mask)
            centre = found.mean(0) + rng.integers(-16, 17, 2)
            if rng.random() < 0.5:  # a lesion-free disc beside it: normal tissue to paint
                disc = np.zeros_like(mask)
                spot = np.clip(centre + rng.integers(-24, 25, 2), 0, np.array(mask.shape) - 1)
                disc[int(spot[0]), int(spot[1])] = True
                region |= lesion_maps.dilate(disc, int(rng.integers(4, 13))) & head_of(images[0])
            top = int(np.clip(centre[0] - WINDOW // 2, 0, mask.shape[0] - WINDOW))
            left = int(np.clip(centre[1] - WINDOW // 2, 0, mask.shape[1] - WINDOW))
            window = (slice(top, top + WINDOW), slice(left, left + WINDOW))
            xs.append(painter_input(label[window], region[window], images[(slice(None), *window)]))
            ys.append(images[(slice(None), *window)])
            labels.append(label[window])
            regions.append(region[window])
        return np.stack(xs), np.stack(ys), np.stack(labels), np.stack(regions)


def train_painter(manifest: Path, out: Path, options: PainterOptions,
                  progress: Callable[[int, dict[str, float]], None] | None = None,
                  command: str | None = None) -> Path:
    """Train a CG-SAMR painter on ``manifest``'s training patients; write
    ``out/painter.safetensors`` (and ``out/split.json``, ``out/painter_log.csv``)."""
    from .dataset import grid_tumour_masks
    from .trainer import TrainOptions, design, normalization_of, save_split

    started, out = time.perf_counter(), Path(out)
    split_options = TrainOptions(institutions=options.institutions, seed=options.seed,
                                 internal_fraction=options.internal_fraction,
                                 normalization=options.normalization, split=options.split)
    entries = read_manifest(Path(manifest))
    split = design([(e.patient, e.institution) for e in entries], split_options)
    training = [e for e in entries if e.patient in set(split["train"])]
    save_split(split, out)
    cache = prepare(training, out / "cache", normalization_of(split_options))
    windows = _Windows(cache, lesion_labels(cache, grid_tumour_masks(training, cache),
                                            cache.rows(set(split["train"]))), options.seed)
    torch.manual_seed(options.seed)
    generator = synthesis.build_model("cgsamr", width_multiplier=options.width)
    condition = generator.in_channels
    # label-wise (lesion, rest of the region) x scale (full, half) discriminators
    discriminators = torch.nn.ModuleList(
        synthesis.build_model("patchgan", conditional=True, condition_channels=condition,
                              width_multiplier=options.width, image_channels=3)
        for _ in range(4))
    segmenter = synthesis.build_model("unet", inputs=("t1w", "t2w", "ce"), levels=3,
                                      width_multiplier=options.width / 2, output="linear",
                                      outputs=lesion_maps.LEVELS + 1)
    betas = (0.5, 0.999)
    optimize_g = torch.optim.Adam([*generator.parameters(), *segmenter.parameters()],
                                  options.learning_rate, betas=betas)
    optimize_d = torch.optim.Adam(discriminators.parameters(), options.learning_rate,
                                  betas=betas)
    regularizer = ConfidenceRegularizer()
    log = (out / "painter_log.csv").open("w", encoding="utf-8", buffering=1)
    log.write("step,l1,gan,fm,sc,cm,d,seconds\n")
    for step in range(1, options.steps + 1):
        x, y, labels, regions = (torch.from_numpy(a) for a in windows.batch(
            step, options.batch_size))
        region = regions[:, None].float()
        lesion = (labels > 0)[:, None].float()
        rois = [lesion, region * (1.0 - lesion)]
        images, intermediate, confidence = generator(x)
        painted = y * (1.0 - region) + images * region

        def judged(k: int, image: torch.Tensor) -> torch.Tensor:
            roi = rois[k % 2]
            condition_k, image_k = x * roi, image * roi
            if k >= 2:
                condition_k, image_k = F.avg_pool2d(condition_k, 2), F.avg_pool2d(image_k, 2)
            return torch.cat([condition_k, image_k], 1)

        # discriminators: real 1, painted 0 (least squares)
        loss_d = sum(((discriminator.net(judged(k, y)) - 1) ** 2).mean()
                     + (discriminator.net(judged(k, painted.detach())) ** 2).mean()
                     for k, discriminator in enumerate(discriminators))
        optimize_d.zero_grad(set_to_none=True)
        loss_d.backward()  # type: ignore[union-attr]
        optimize_d.step()

        gan = fm = torch.zeros(())
        for k, discriminator in enumerate(discriminators):
            fake = _layers(discriminator, judged(k, painted))
            with torch.no_grad():
                real = _layers(discriminator, judged(k, y))
            gan = gan + ((fake[-1] - 1) ** 2).mean()
            fm = fm + sum(F.mse_loss(f, r) for f, r in zip(fake[:-1], real[:-1], strict=True))
        levels = F.one_hot(labels.long(), lesion_maps.LEVELS + 1).permute(0, 3, 1, 2)
        sc = (generalised_dice(levels, segmenter(y).softmax(1))
              + generalised_dice(levels, segmenter(painted).softmax(1)))
        cm = confidence_loss(intermediate, confidence, y, regularizer.value)
        l1 = ((images - y).abs() * region).sum() / (region.sum() * 3).clamp_min(1.0)
        loss = gan + FM_WEIGHT * fm + SC_WEIGHT * sc + CM_WEIGHT * cm + L1_WEIGHT * l1
        optimize_g.zero_grad(set_to_none=True)
        loss.backward()
        optimize_g.step()
        regularizer.update(float(confidence.detach().mean()))
        values = {name: float(term.detach()) for name, term in (
            ("l1", l1), ("gan", gan), ("fm", fm), ("sc", sc), ("cm", cm), ("d", loss_d))}
        log.write(f"{step}," + ",".join(f"{v:.5g}" for v in values.values())
                  + f",{time.perf_counter() - started:.1f}\n")
        if progress is not None:
            progress(step, values)
    log.close()
    seconds = round(time.perf_counter() - started, 1)
    sites = sorted({e.institution for e in training})
    return save_painter(out / "painter.safetensors", generator.eval(), {
        "normalization": cache.normalization,
        "training": {"options": asdict(options),
                     "institutions": sites, "patients": len(training),
                     "lesion_slices": len(windows.rows), "steps": options.steps,
                     "seconds": seconds, "command": command, "manifest": str(manifest),
                     "final_losses": values}})
