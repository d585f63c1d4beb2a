"""U-Net baseline (Ronneberger et al. 2015) as seed 000 compares it: U-Net_T1w, U-Net_T2w
(one input) and U-Net_T1w+T2w (both inputs as channels).

Four levels (64-512 features, 1024 at the bottom) of convolution blocks, max-pool down,
bilinear up, skip connections, 1x1 output convolution (tanh or linear).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvBlock, upsample, width


class UNet(nn.Module):
    """``forward`` takes (B, len(inputs), H, W); H and W multiples of 16."""

    def __init__(self, inputs: tuple[str, ...] = ("t1w", "t2w"), width_multiplier: float = 1.0,
                 levels: int = 4, output: Literal["tanh", "linear"] = "tanh",
                 outputs: int = 1) -> None:
        """``outputs``: output channels (1 for a CE-T1w; a segmentation's class scores)."""
        super().__init__()
        self.inputs = tuple(inputs)
        self.config = {"inputs": list(inputs), "width_multiplier": width_multiplier,
                       "levels": levels, "output": output}
        if outputs != 1:  # recorded only when set, so older checkpoints' configs still match
            self.config["outputs"] = outputs
        sizes = [width(64 * 2**i, width_multiplier) for i in range(levels + 1)]
        self.down = nn.ModuleList()
        previous = len(self.inputs)
        for size in sizes[:-1]:
            self.down.append(ConvBlock(previous, size))
            previous = size
        self.bottom = ConvBlock(previous, sizes[-1])
        self.up = nn.ModuleList(
            ConvBlock(sizes[i + 1] + sizes[i], sizes[i]) for i in reversed(range(levels))
        )
        self.head = nn.Conv2d(sizes[0], outputs, 1)
        self.output_activation = nn.Tanh() if output == "tanh" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for block, skip in zip(self.up, reversed(skips), strict=True):
            x = block(torch.cat([upsample(x, skip.shape[-2:]), skip], 1))
        return self.output_activation(self.head(x))
