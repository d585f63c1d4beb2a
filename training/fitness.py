"""Training the fitness classifier (seed 000's classification network that screens out data
the model is not fit for) after the generator, on the same cached, normalised model-grid
slices: positives are the training patients' slices (with mild augmentation: contrast,
gain, flips, small shifts), negatives the same slices made unfit on the fly, one fault kind
per slice (:data:`FAULTS`). The study score is the mean slice logit; the refusal threshold is
set on the internal patients (never trained on) for at most 5 % false refusals, with a
margin, and the detection of every fault kind on them is recorded in the checkpoint.

Fault kinds, each with a random severity (:func:`make_unfit`):

- ``swapped``: T1w and T2w exchanged;
- ``duplicated``: one series copied into the other's place;
- ``noise``: one series replaced by noise;
- ``misregistered``: one series moved 15-45 mm or turned 12-30 degrees (beyond what the
  pipeline's registration bound of 15 mm would accept);
- ``protocol``: one series with a contrast far from any T1w or T2w protocol (inverted,
  folded, squared, saturated);
- ``artefact``: severe ghosting, extreme coil non-uniformity or stripes;
- ``body``: not a head: a torso-like cross-section filling the field of view.

Not generated: tumours outside the trained size range (that needs seed 004's tumour
augmentation; the simulator draws 1-5 cm tumours and the classifier sees only those).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

import synthesis

from .dataset import SliceCache

FAULTS = ("swapped", "duplicated", "noise", "misregistered", "protocol", "artefact", "body")
#: At most this share of the internal patients may be refused (issue: <= 5 %).
FALSE_REFUSAL_TARGET = 0.05
#: Logits between the lowest internal patient kept and the threshold: new sites vary more.
MARGIN = 1.0
#: Model-grid pixels of a misregistration: at ~0.9-1.1 mm per pixel, 15-45 mm.
SHIFT_PX = (16, 46)
#: The pixel size (mm) SHIFT_PX is counted in: the seeds' 256 x 224 grid over the simulated
#: sites' 210-240 mm fields; a model at a fixed spacing scales the shift by this / its spacing.
SHIFT_PIXEL_MM = 1.0


@dataclass
class FitnessOptions:
    """How long and how to train the classifier."""

    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 1e-3
    width: float = 1.0
    seed: int = 0


def _head(channel: np.ndarray) -> np.ndarray:
    """The head of a normalised slice: above its background (each slice's lowest value)."""
    return channel > channel.min() + 1e-3


def _restandardise(channel: np.ndarray, head: np.ndarray) -> np.ndarray:
    """z-score the head of ``channel`` again and put the background where normalisation puts
    it (as the pipeline's per-patient z-score would for such a series)."""
    values = channel[head]
    if values.size < 10 or values.std() == 0:
        return channel
    out = (channel - values.mean()) / values.std()
    background = (0 - values.mean()) / values.std() if (~head).any() else out.min()
    return np.where(head, out, min(background, out[head].min())).astype(np.float32)


def _torso(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A torso- or pelvis-like cross-section (2 channels): a body filling most of the field,
    a fat rim, organs and bones of random contrast."""
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols]
    cy, cx = rows * rng.uniform(0.45, 0.55), cols * rng.uniform(0.45, 0.55)
    ay, ax = rows * rng.uniform(0.33, 0.45), cols * rng.uniform(0.42, 0.49)
    radius = ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2
    out = np.zeros((2, rows, cols), np.float32)
    for k in range(2):
        image = np.where(radius < 1, rng.uniform(0.8, 1.2), 0.0)
        image = np.where((radius > 0.8) & (radius < 1), rng.uniform(1.2, 2.0), image)  # fat
        for _ in range(rng.integers(4, 9)):
            oy, ox = cy + rng.uniform(-0.6, 0.6) * ay, cx + rng.uniform(-0.6, 0.6) * ax
            r = rng.uniform(0.05, 0.22) * min(ay, ax)
            image = np.where((y - oy) ** 2 + (x - ox) ** 2 < r * r, rng.uniform(0.1, 2.5), image)
        image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0, 0.03, image.shape)
        out[k] = _restandardise(image.astype(np.float32), radius < 1)
    return out


def make_unfit(kind: str, slice_: np.ndarray, rng: np.random.Generator,
               pixel_mm: float | None = None) -> np.ndarray:
    """``slice_`` (2, H, W: normalised T1w, T2w) made unfit by a fault of ``kind``;
    ``pixel_mm``: the slice's pixel size where the grid has a fixed one (None: the seeds')."""
    x = np.array(slice_, np.float32, copy=True)
    k = int(rng.integers(0, 2))
    head = _head(x[k])
    if kind == "swapped":
        return x[[1, 0]]
    if kind == "duplicated":
        x[1 - k] = x[k]
        return x
    if kind == "noise":
        x[k] = rng.normal(0.0, 1.0, x[k].shape).astype(np.float32)
        return x
    if kind == "misregistered":
        if rng.random() < 0.5:
            distance = rng.uniform(*SHIFT_PX) * (1.0 if pixel_mm is None
                                                 else SHIFT_PIXEL_MM / pixel_mm)
            angle = rng.uniform(0, 2 * np.pi)
            moved = ndimage.shift(x[k], (distance * np.sin(angle), distance * np.cos(angle)),
                                  order=1, cval=float(x[k].min()))
        else:
            moved = ndimage.rotate(x[k], rng.choice([-1, 1]) * rng.uniform(12, 30),
                                   reshape=False, order=1, cval=float(x[k].min()))
        x[k] = moved
        return x
    if kind == "protocol":
        values = x[k]
        remap = rng.integers(0, 4)
        if remap == 0:
            changed = -values
        elif remap == 1:
            changed = np.abs(values - rng.uniform(-0.5, 0.5))
        elif remap == 2:
            changed = values**2
        else:
            changed = np.tanh(rng.uniform(3, 6) * values)
        x[k] = _restandardise(np.where(head, changed, values.min()), head)
        return x
    if kind == "artefact":
        choice = rng.integers(0, 3)
        rows, cols = x[k].shape
        signal = np.where(head, x[k] - x[k].min(), 0.0)
        if choice == 0:  # ghosting along the phase-encoding direction
            axis = int(rng.integers(0, 2))
            ghost = np.roll(signal, (rows if axis == 0 else cols) // 2, axis=axis)
            changed = signal + rng.uniform(0.3, 0.8) * ghost
            mask = changed > 0.05 * changed.max()
        elif choice == 1:  # extreme coil non-uniformity
            ramp = np.linspace(-1, 1, cols)[None] * np.cos(rng.uniform(0, np.pi)) + \
                np.linspace(-1, 1, rows)[:, None] * np.sin(rng.uniform(0, np.pi))
            changed, mask = signal * np.exp(rng.uniform(1.2, 2.5) * ramp), head
        else:  # stripes (spikes in k-space)
            y, xx = np.mgrid[0:rows, 0:cols]
            stripes = np.sin(2 * np.pi * (y * rng.uniform(0.05, 0.25) + xx * rng.uniform(0, 0.1)))
            changed, mask = signal * (1 + rng.uniform(0.5, 0.9) * stripes), head
        x[k] = _restandardise(changed.astype(np.float32), mask)
        return x
    if kind == "body":
        return _torso(x.shape[1:], rng)
    raise ValueError(f"unknown fault kind {kind!r}")


def _augment(slice_: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A fit slice varied as acquisitions vary: left-right flip, a small shift, each
    series' contrast bent (gamma 0.75-1.33 on its head) and its gain changed."""
    x = np.array(slice_, np.float32, copy=True)
    if rng.random() < 0.5:
        x = x[:, :, ::-1]
    shift = rng.integers(-4, 5, 2)
    x = np.stack([np.roll(c, tuple(shift), (0, 1)) for c in x])
    for k in range(2):
        head = _head(x[k])
        if head.sum() < 10:
            continue
        values = x[k] - x[k][head].min()
        bent = np.power(np.maximum(values, 0), rng.uniform(0.75, 1.33))
        x[k] = _restandardise(np.where(head, bent, 0).astype(np.float32) *
                              rng.uniform(0.8, 1.25), head)
    return x


@dataclass
class FitnessResult:
    """The trained classifier and its metadata for the checkpoint."""

    model: torch.nn.Module
    meta: synthesis.FitnessMeta
    losses: list[float] = field(default_factory=list)


def study_logit(model: torch.nn.Module, slices: np.ndarray, device: torch.device) -> float:
    """A study's score: the mean of its slices' logits (higher: fit)."""
    model.eval()
    with torch.inference_mode():
        logits = [model(torch.from_numpy(np.ascontiguousarray(slices[i:i + 16], np.float32))
                        .to(device)) for i in range(0, len(slices), 16)]
    return float(torch.cat(logits).mean())


def train_fitness(cache: SliceCache, train: Sequence[str], internal: Sequence[str],
                  device: torch.device, options: FitnessOptions | None = None) -> FitnessResult:
    """Train on ``train`` patients' slices and their faults, calibrate on ``internal``."""
    options = options or FitnessOptions()
    rng = np.random.default_rng(options.seed)
    torch.manual_seed(options.seed)
    model = synthesis.build_model("fitness", width_multiplier=options.width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), options.learning_rate)
    rows = cache.rows(set(train))
    half = options.batch_size // 2
    losses = []
    model.train()
    for _ in range(options.steps):
        picked = np.sort(rng.choice(rows, options.batch_size, replace=len(rows) < 2 * half))
        slices = np.asarray(cache.inputs[picked][:, :2], np.float32)
        batch = [_augment(s, rng) for s in slices[:half]]
        batch += [make_unfit(str(rng.choice(FAULTS)), s, rng, cache.grid.spacing_mm)
                  for s in slices[half:]]
        x = torch.from_numpy(np.stack(batch)).to(device)
        y = torch.cat([torch.ones(half), torch.zeros(len(batch) - half)]).to(device)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return FitnessResult(model.eval(), calibrate(model, cache, internal or train, device,
                                                 options), losses)


def calibrate(model: torch.nn.Module, cache: SliceCache, patients: Sequence[str],
              device: torch.device, options: FitnessOptions) -> synthesis.FitnessMeta:
    """The refusal threshold from ``patients`` (fit studies never trained on) and the
    detection of each fault kind on the same studies at that threshold."""
    rng = np.random.default_rng(options.seed + 1)
    fit = {p: study_logit(model, np.asarray(cache.inputs[cache.rows({p})][:, :2], np.float32),
                          device) for p in patients}
    scores = np.array(sorted(fit.values()))
    kept = scores[int(np.floor(FALSE_REFUSAL_TARGET * len(scores)))]
    threshold = float(kept - MARGIN)
    detected = {}
    for kind in FAULTS:
        unfit = []
        for patient in patients:
            slices = np.asarray(cache.inputs[cache.rows({patient})][:, :2], np.float32)
            seed = int(rng.integers(0, 2**31))
            faulty = np.stack([make_unfit(kind, s, np.random.default_rng(seed),
                                          cache.grid.spacing_mm) for s in slices])
            unfit.append(study_logit(model, faulty, device))
        detected[kind] = round(float(np.mean(np.array(unfit) < threshold)), 3)
    return synthesis.FitnessMeta(
        architecture=synthesis.Architecture(name="fitness", config=model.config),
        threshold=round(threshold, 4), false_refusal_target=FALSE_REFUSAL_TARGET,
        faults=list(FAULTS),
        calibration={"patients": len(patients),
                     "fit_scores": [round(float(s), 3) for s in scores],
                     "false_refusals": round(float(np.mean(scores < threshold)), 3),
                     "detected": detected, "margin": MARGIN})
