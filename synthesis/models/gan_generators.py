"""The pix2pix and CycleGAN generators seed 000 compares against (Isola et al. 2017; Zhu et
al. 2017), in their published configurations, for one input modality or several as channels.

- ``Pix2PixUNet``: encoder of 4x4 stride-2 convolutions (BN, LeakyReLU 0.2), decoder of 4x4
  transposed convolutions (BN, ReLU, dropout 0.5 in the three innermost), skips, tanh.
  Five levels, so 256x224 (multiples of 32) works; pix2pix's 8-level "unet_256" needs
  square 256x256.
- ``ResnetGenerator``: CycleGAN's: reflection pad + 7x7 conv, two stride-2 downsamplings, nine
  residual blocks, two transposed-convolution upsamplings, 7x7 conv, tanh; instance norm.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .blocks import width


class Pix2PixUNet(nn.Module):
    def __init__(self, inputs: tuple[str, ...] = ("t1w", "t2w"), width_multiplier: float = 1.0,
                 levels: int = 5, output: Literal["tanh", "linear"] = "tanh") -> None:
        super().__init__()
        self.inputs = tuple(inputs)
        self.config = {"inputs": list(inputs), "width_multiplier": width_multiplier,
                       "levels": levels, "output": output}
        sizes = [width(min(64 * 2**i, 512), width_multiplier) for i in range(levels)]
        self.down = nn.ModuleList()
        previous = len(self.inputs)
        for i, size in enumerate(sizes):
            layers: list[nn.Module] = [nn.Conv2d(previous, size, 4, 2, 1, bias=i == 0)]
            if 0 < i < levels - 1:
                layers.append(nn.BatchNorm2d(size))
            layers.append(nn.LeakyReLU(0.2, inplace=True) if i < levels - 1 else nn.ReLU(True))
            self.down.append(nn.Sequential(*layers))
            previous = size
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            in_channels = sizes[i] if i == levels - 1 else sizes[i] * 2
            out = sizes[i - 1] if i else 1
            if i == 0:
                self.up.append(nn.Sequential(
                    nn.ConvTranspose2d(in_channels, out, 4, 2, 1),
                    nn.Tanh() if output == "tanh" else nn.Identity()))
                continue
            layers = [nn.ConvTranspose2d(in_channels, out, 4, 2, 1, bias=False),
                      nn.BatchNorm2d(out)]
            if i >= levels - 3:
                layers.append(nn.Dropout(0.5))
            layers.append(nn.ReLU(True))
            self.up.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        skips.pop()
        for i, block in enumerate(self.up):
            x = block(x if i == 0 else torch.cat([x, skips.pop()], 1))
        return x


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
            nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    def __init__(self, inputs: tuple[str, ...] = ("t1w",), width_multiplier: float = 1.0,
                 blocks: int = 9, output: Literal["tanh", "linear"] = "tanh") -> None:
        super().__init__()
        self.inputs = tuple(inputs)
        self.config = {"inputs": list(inputs), "width_multiplier": width_multiplier,
                       "blocks": blocks, "output": output}
        c = width(64, width_multiplier)
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(len(self.inputs), c, 7),
                                   nn.InstanceNorm2d(c), nn.ReLU(True)]
        for k in (1, 2):
            layers += [nn.Conv2d(c * k, c * 2 * k, 3, 2, 1), nn.InstanceNorm2d(c * 2 * k),
                       nn.ReLU(True)]
        layers += [_Residual(c * 4) for _ in range(blocks)]
        for k in (4, 2):
            layers += [nn.ConvTranspose2d(c * k, c * k // 2, 3, 2, 1, output_padding=1),
                       nn.InstanceNorm2d(c * k // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(c, 1, 7),
                   nn.Tanh() if output == "tanh" else nn.Identity()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
