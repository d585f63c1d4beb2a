"""Running a generator on slices: device selection, batching in bounded chunks, mixed precision
and channels-last on CUDA, inference mode, deterministic on CPU, and the confidence map.

Confidence is an expected error turned into (0, 1]: confidence = TOLERANCE / (TOLERANCE + e),
where e is the expected absolute error of the synthetic value in normalised units (standard
deviations of the study's T1w inside the head). So a confidence of 0.5 means the model
expects the synthetic intensity there to be off by TOLERANCE = 0.5 T1w standard deviations
(result.json gives that in scanner units for each study); c means e = TOLERANCE (1 - c) / c:
0.8 a quarter of it, 0.25 three times it. The map never saturates, so it ranks every pixel
(a min(1, T / e) map ties all confident pixels at 1). e is the larger of two estimates:

- the learned one: the confidence module's error head (synthesis/models/mmgsn.py), trained
  with CG-SAMR's confidence loss (a Laplace likelihood) on the VCE's own error at full
  resolution, predicts E|error| per pixel; refitted with ``vcemri refit-confidence
  --quantile q`` it predicts instead the error exceeded with probability 1 - q (checkpoint
  ``confidence.error_quantile``), and c = 0.5 then means a 1 - q chance of an error above
  TOLERANCE. (CG-SAMR's own half-resolution confidence guides the network; it describes the
  intermediate image, not the delivered one.)
- test-time augmentation: the model also sees each slice mirrored left-right (the head is
  nearly symmetric); half the disagreement, |y - flip(y_flipped)| / 2, is an error estimate.

The delivered VCE is the mean of the plain and the mirrored pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from config import ModelError

#: The expected error (normalised units, T1w head SDs) at which the confidence is 0.5.
TOLERANCE = 0.5


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {name} was asked for but CUDA is not available here",
                             hint="use device 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"device {name} does not exist ({torch.cuda.device_count()} GPUs)")
    return device


def _chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


class Predictor:
    """Runs ``model`` on (N, C, H, W) inputs ``batch_size`` slices at a time."""

    def __init__(self, model: nn.Module, device: torch.device, batch_size: int = 8) -> None:
        self.device = device
        self.batch_size = max(1, batch_size)
        self.model = model.to(device).eval()
        self.cuda = device.type == "cuda"
        # channels-last convolutions: faster on CUDA and, with oneDNN, on the CPU too (a
        # width-0.25 MMgSN-Net batch of 8 slices: 2.2 s instead of 2.7 s on 2 cores)
        self.model = self.model.to(memory_format=torch.channels_last)
        if self.cuda:
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _autocast(self) -> object:
        if self.cuda:
            return torch.autocast("cuda", dtype=self.dtype)
        return nullcontext()

    @property
    def guided(self) -> bool:
        """Whether the model has seed 002's confidence module."""
        return getattr(self.model, "guidance", None) is not None

    def predict(self, inputs: np.ndarray, mirror: bool = False,
                aux: bool = False, present: Sequence[bool] | None = None) -> Any:
        """(N, C, H, W) -> (N, H, W) float32; ``mirror`` runs on left-right mirrored inputs
        and mirrors the outputs back; ``aux`` (a model with the confidence module) also
        returns its learned maps, (N, 2, H, W): the confidence of the half-resolution
        intermediate image (upsampled) and the expected absolute error of the VCE.
        ``present`` (a model that accepts subsets of its inputs, seed 003) flags the inputs
        acquired; the others' channels are ignored."""
        outputs, confidences = [], []
        extra = {} if present is None else {"present": list(present)}
        with torch.inference_mode(), self._autocast():  # type: ignore[attr-defined]
            for part in _chunks(len(inputs), self.batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(inputs[part])).to(self.device)
                if mirror:
                    batch = torch.flip(batch, dims=[-1])
                batch = batch.contiguous(memory_format=torch.channels_last)
                if aux:
                    out, _, confidence, log_error = self.model(batch, aux=True)
                    confidence = F.interpolate(confidence.float(), size=out.shape[-2:],
                                               mode="bilinear", align_corners=False)
                    maps = torch.cat([confidence, torch.exp(log_error.float())], 1)
                    if mirror:
                        maps = torch.flip(maps, dims=[-1])
                    confidences.append(maps.cpu())
                else:
                    out = self.model(batch, **extra)
                out = out.float()
                if mirror:
                    out = torch.flip(out, dims=[-1])
                outputs.append(out[:, 0].cpu())
        if aux:
            return torch.cat(outputs).numpy(), torch.cat(confidences).numpy()
        return torch.cat(outputs).numpy()

    def score(self, classifier: nn.Module, inputs: np.ndarray) -> float:
        """A study's fitness score: the mean logit of ``classifier`` over its slices."""
        classifier = classifier.to(self.device).eval()
        logits = []
        with torch.inference_mode():
            for part in _chunks(len(inputs), self.batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(inputs[part])).to(self.device)
                logits.append(classifier(batch).float().cpu())
        return float(torch.cat(logits).mean())



def confidence_of(expected_error: np.ndarray) -> np.ndarray:
    """Confidence in (0, 1] from an expected absolute error (normalised units)."""
    return (TOLERANCE / (TOLERANCE + np.maximum(expected_error, 0.0))).astype(np.float32)


def stated_error(confidence: np.ndarray) -> np.ndarray:
    """The error a confidence c stands for, TOLERANCE (1 - c) / c (normalised units): the
    inverse of :func:`confidence_of`."""
    c = np.clip(confidence, 1e-6, 1.0)
    return TOLERANCE * (1.0 - c) / c



def with_confidence(plain: np.ndarray, mirrored: np.ndarray,
                    learned: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prediction (mean of the plain and mirrored passes) and confidence in [0, 1] from the
    larger of the error estimates (see the module docstring); ``learned``: the model's maps
    (predict's ``aux``), averaged over both passes."""
    expected = np.abs(plain - mirrored) / 2.0
    if learned is not None:
        expected = np.maximum(expected, learned[:, 1])
    return ((plain + mirrored) / 2.0).astype(np.float32), confidence_of(expected)
