"""Building blocks shared by the generators: convolution blocks, SGS fusion, SAGAN attention.

Where the seeds are silent the choices are written here and used everywhere:
- a convolution block is ``convs`` x (3x3 convolution, batch norm, LeakyReLU 0.2), two by
  default ("the convolution layers inside the convolution blocks", seed 000 (B));
- upsampling is bilinear x2 (no transposed convolutions, which leave checkerboard artefacts);
- channel counts are the seed's times a width multiplier, never below 4.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.2


def width(channels: int, multiplier: float) -> int:
    """``channels`` scaled by the width multiplier (at least 4)."""
    return max(4, int(round(channels * multiplier)))


class ConvBlock(nn.Sequential):
    """``convs`` x (3x3 conv -> batch norm -> LeakyReLU), keeping the spatial size."""

    def __init__(self, in_channels: int, out_channels: int, convs: int = 2) -> None:
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [
                nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1,
                          bias=False),
                nn.BatchNorm2d(out_channels),
                nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            ]
        super().__init__(*layers)


class SynergisticGuidance(nn.Module):
    """SGS (seed 000 (B), FIG. 6): fuse two same-level feature maps three ways (pixel-wise
    sum, product and maximum), concatenate, and select with two 3x3 convolution layers
    (``hidden`` then ``out`` filters: 128 & 128 for SGS1, 128 & 256 for SGS2)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.select = nn.Sequential(
            nn.Conv2d(3 * in_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(hidden, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fused = torch.cat([a + b, a * b, torch.maximum(a, b)], dim=1)
        return self.select(fused)


class Concatenation(nn.Module):
    """The seed's ablation of SGS: the two feature maps concatenated, no selection."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, b], dim=1)


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al. 2019): 1x1 query and key with C/8 channels, value
    with C channels, softmax(q^T k) without scaling, output ``gamma * attention + x`` with
    ``gamma`` learned from 0.

    ``pool`` max-pools keys and values (as BigGAN's SAGAN block does by 2) so that attention
    at 128x112 needs 1/pool^2 of the memory; ``pool=1`` is the exact SAGAN form. Computed with
    ``scaled_dot_product_attention`` (scale 1) on one head whose query and key are padded with
    zeros to the value's width: q.k is unchanged, and with equal widths the fused
    (flash) kernels apply, which never hold the (HW x hw) matrix; with unequal widths the CPU
    falls back to the unfused form (``python benchmarks/inference.py``, 2 cores: a width-0.25
    MMgSN-Net 0.13 s per slice fused, 0.20 s before).
    """

    def __init__(self, channels: int, pool: int = 4) -> None:
        super().__init__()
        inner = max(1, channels // 8)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        source = F.max_pool2d(x, self.pool) if self.pool > 1 else x
        pad = (0, c - self.query.out_channels)
        q = F.pad(self.query(x).flatten(2).transpose(1, 2), pad)  # (B, HW, C)
        k = F.pad(self.key(source).flatten(2).transpose(1, 2), pad)  # (B, hw, C)
        v = self.value(source).flatten(2).transpose(1, 2)  # (B, hw, C)
        attended = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None],
                                                  scale=1.0)[:, 0]  # (B, HW, C)
        return x + self.gamma * attended.transpose(1, 2).reshape(b, c, h, w)


class ConfidenceGuidance(nn.Module):
    """CG-SAMR's synthesis and confidence map modules (seed 002, Fig. 3 and eq. 1) on a
    decoder's half-resolution features f: SM, four convolution blocks, gives an intermediate
    image y_half; CM, four convolution blocks on f and y_half, gives the confidence c in (0, 1)
    of each of its pixels; the confidence-masked intermediate result y_half * c is returned
    to be concatenated with f for the next decoder block. Trained with
    L_CM = mean(c |y_half - y|) - lambda mean(log c) (training/objectives.py), whose optimum
    is c = min(1, lambda / E|y_half - y|): a pixel's confidence says how large its error is
    expected to be."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(4, channels // 2)

        def module(first: int) -> nn.Sequential:
            return nn.Sequential(ConvBlock(first, inner, 1), ConvBlock(inner, inner, 1),
                                 ConvBlock(inner, inner, 1), nn.Conv2d(inner, 1, 3, padding=1))

        self.synthesis = module(channels)
        self.confidence = module(channels + 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(intermediate image, confidence), each (B, 1, H, W) at the features' size."""
        intermediate = self.synthesis(features)
        confidence = torch.sigmoid(self.confidence(torch.cat([features, intermediate], 1)))
        return intermediate, confidence


def upsample(x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
    """Bilinear upsampling by 2, or to ``size`` (rows, columns)."""
    if size is None:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    return F.interpolate(x, size=(int(size[0]), int(size[1])), mode="bilinear",
                         align_corners=False)
