"""The fitness classifier (seed 000: "a classification network to screen out unfit data"
before synthesis): does this pair of normalised T1w/T2w model-grid slices look like what the
model was trained on?

A small CPU-friendly CNN: the 2-channel slice at half the model grid's size, four
convolution blocks (3x3, stride 2, batch norm, LeakyReLU; 16-32-64-128 channels times the
width), global mean and max pooling, a linear layer: one logit per slice, positive for fit.
A study's score is the mean of its slices' logits. Trained by ``vcemri train`` after the
generator (training/fitness.py) on the training studies against faults made from them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import LEAKY_SLOPE, width


class FitnessNet(nn.Module):
    """``forward`` takes (B, 2, H, W) model-grid slices (T1w, T2w) and returns (B,) logits."""

    inputs = ("t1w", "t2w")

    def __init__(self, width_multiplier: float = 1.0) -> None:
        super().__init__()
        self.config = {"width_multiplier": width_multiplier}
        sizes = [width(c, width_multiplier) for c in (16, 32, 64, 128)]
        layers: list[nn.Module] = []
        previous = 2
        for size in sizes:
            layers += [nn.Conv2d(previous, size, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(size), nn.LeakyReLU(LEAKY_SLOPE, inplace=True)]
            previous = size
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * previous, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(F.avg_pool2d(x, 2))
        pooled = torch.cat([features.mean((2, 3)), features.amax((2, 3))], 1)
        return self.head(pooled)[:, 0]
