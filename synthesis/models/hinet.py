"""Hi-Net baseline (Zhou et al., IEEE TMI 39:2772, 2020), the hybrid-fusion network seed 000
compares MMgSN-Net against and departs from.

Two modality-specific networks encode T1w and T2w (and decode them back, for Hi-Net's
reconstruction loss); a mixed fusion block (MFB) at each of three levels fuses the two
modalities' features by sum, product and maximum, concatenated and selected by a 3x3
convolution, with the previous level's fused features (Hi-Net's "hybrid" fusion); a decoder
synthesizes the target from the deepest fusion with the other fusions as skips. Unlike
MMgSN-Net, nothing is fed back into the modality encoders.

Training as published: the synthesis L1 (weight 100) and each modality's reconstruction L1
(weight 20 each; Hi-Net's public training code) with the adversarial loss; ``forward(x,
reconstruct=True)`` gives the synthesis and both reconstructions from one pass, so every
parameter takes part in a training step (DistributedDataParallel needs that).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvBlock, SynergisticGuidance, upsample, width


class _ModalityNet(nn.Module):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(
            ConvBlock(1 if i == 0 else sizes[i - 1], s) for i, s in enumerate(sizes)
        )
        self.decoders = nn.ModuleList(
            ConvBlock(sizes[i] + (sizes[i + 1] if i + 1 < len(sizes) else 0), sizes[i])
            for i in range(len(sizes))
        )
        self.head = nn.Conv2d(sizes[0], 1, 1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else F.max_pool2d(x, 2))
            features.append(x)
        return features

    def reconstruct(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The modality back from its features, before the output activation."""
        x = self.decoders[-1](features[-1])
        for i in reversed(range(len(features) - 1)):
            x = self.decoders[i](torch.cat([features[i], upsample(x, features[i].shape[-2:])], 1))
        return self.head(x)


class HiNet(nn.Module):
    """``forward`` takes (B, 2, H, W) = T1w, T2w; ``reconstruct`` gives both inputs back, in
    the inputs' normalised units (the output activation applies to them too)."""

    inputs = ("t1w", "t2w")

    def __init__(self, width_multiplier: float = 1.0,
                 output: Literal["tanh", "linear"] = "tanh") -> None:
        super().__init__()
        self.config = {"width_multiplier": width_multiplier, "output": output}
        sizes = [width(c, width_multiplier) for c in (64, 128, 256)]
        self.t1_net = _ModalityNet(sizes)
        self.t2_net = _ModalityNet(sizes)
        self.fuse = nn.ModuleList(SynergisticGuidance(s, s, s) for s in sizes)
        self.mix = nn.ModuleList(
            ConvBlock(sizes[i] + (sizes[i - 1] if i else 0), sizes[i]) for i in range(len(sizes))
        )
        self.decoders = nn.ModuleList(
            ConvBlock(sizes[i] + (sizes[i + 1] if i + 1 < len(sizes) else 0), sizes[i])
            for i in range(len(sizes))
        )
        self.head = nn.Conv2d(sizes[0], 1, 1)
        self.output_activation = nn.Tanh() if output == "tanh" else nn.Identity()

    def _fused(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                               list[torch.Tensor]]:
        f1 = self.t1_net.encode(x[:, 0:1])
        f2 = self.t2_net.encode(x[:, 1:2])
        fused: list[torch.Tensor] = []
        for i, (a, b) in enumerate(zip(f1, f2, strict=True)):
            level = self.fuse[i](a, b)
            if i:
                level = torch.cat([level, F.max_pool2d(fused[-1], 2)], 1)
            fused.append(self.mix[i](level))
        return f1, f2, fused

    def forward(self, x: torch.Tensor, reconstruct: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The synthesis; with ``reconstruct`` also the T1w's and T2w's reconstructions."""
        f1, f2, fused = self._fused(x)
        y = self.decoders[-1](fused[-1])
        for i in reversed(range(len(fused) - 1)):
            y = self.decoders[i](torch.cat([fused[i], upsample(y, fused[i].shape[-2:])], 1))
        y = self.output_activation(self.head(y))
        if not reconstruct:
            return y
        return (y, self.output_activation(self.t1_net.reconstruct(f1)),
                self.output_activation(self.t2_net.reconstruct(f2)))

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The modality networks' reconstructions of T1w and T2w (Hi-Net's auxiliary loss)."""
        _, r1, r2 = self(x, reconstruct=True)
        return r1, r2
