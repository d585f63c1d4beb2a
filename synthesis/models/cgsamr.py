"""CG-SAMR (seed 002, Fig. 2 and 3): a generator that synthesises several MR sequences at once
from a lesion label map and an anatomical prior, each through its own branch of a
"stretch-out" up-sampling decoder whose half-resolution synthesis (SM) and confidence map
(CM) modules guide the branch's last block.

Here it paints lesions into real slices (``vcemri train --architecture cgsamr``, then
``--paint``; training/painting.py): the input is

- the lesion label map as one-hot channels, one per quantised intensity level (seed 004's
  three levels, taken from the CE-T1w by multi-Otsu, training/lesion_maps.py);
- the region to paint (1 inside) and, as the anatomical prior, the patient's own T1w, T2w and
  CE-T1w slices with that region blanked (0). The seed's prior is a population atlas, which
  lets it invent whole brains; a lesion painted into a training patient must sit in that
  patient's anatomy, so the prior is the patient outside the region.

The output is one image per sequence (T1w, T2w, CE-T1w, in the normalised units of the
training cache), with each branch's half-resolution intermediate image and confidence.

Encoder and decoder follow Johnson et al. as the seed does (a 7x7 convolution, two stride-2
convolutions, residual blocks at a quarter of the resolution), at the repository's width
multiplier (``synthesis/models/blocks.py``); H and W must be multiples of 4.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .blocks import LEAKY_SLOPE, ConfidenceGuidance, ConvBlock, upsample, width


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2,
                  bias=False),
        nn.BatchNorm2d(out_channels), nn.LeakyReLU(LEAKY_SLOPE, inplace=True))


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Branch(nn.Module):
    """One sequence's branch of the stretch-out up-sampling: up to half resolution, SM + CM,
    the confidence-masked intermediate image joined to the features, up to full resolution."""

    def __init__(self, deep: int, half: int, full: int) -> None:
        super().__init__()
        self.to_half = ConvBlock(deep, half)
        self.guidance = ConfidenceGuidance(half)
        self.to_full = ConvBlock(half + 1, full)
        self.out = nn.Conv2d(full, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.to_half(upsample(x))
        intermediate, confidence = self.guidance(f)
        y = self.to_full(upsample(torch.cat([f, intermediate * confidence], 1)))
        return self.out(y), intermediate, confidence


class CGSAMR(nn.Module):
    """``forward(x)`` with x = (B, levels + 1 + len(sequences), H, W): the one-hot lesion
    levels, the region to paint, the prior's sequences -> (images, intermediates,
    confidences), each (B, len(sequences), ., .); images at H x W, the others at H/2 x W/2."""

    def __init__(self, sequences: tuple[str, ...] = ("t1w", "t2w", "ce"), levels: int = 3,
                 width_multiplier: float = 0.25, residual_blocks: int = 3) -> None:
        super().__init__()
        self.sequences, self.levels = tuple(sequences), levels
        self.config: dict[str, Any] = {
            "sequences": list(sequences), "levels": levels,
            "width_multiplier": width_multiplier, "residual_blocks": residual_blocks}
        c1, c2, c3 = (width(c, width_multiplier) for c in (64, 128, 256))
        self.encoder = nn.Sequential(
            _conv(levels + 1 + len(self.sequences), c1, 7), _conv(c1, c2, 3, 2),
            _conv(c2, c3, 3, 2), *(_Residual(c3) for _ in range(residual_blocks)))
        self.branches = nn.ModuleList(_Branch(c3, c2, c1) for _ in self.sequences)

    @property
    def in_channels(self) -> int:
        return self.levels + 1 + len(self.sequences)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(f"CG-SAMR needs rows and columns that are multiples of 4, not "
                             f"{tuple(x.shape[-2:])}")
        latent = self.encoder(x)
        outputs = [branch(latent) for branch in self.branches]
        return tuple(torch.cat([o[k] for o in outputs], 1) for k in range(3))  # type: ignore[return-value]
