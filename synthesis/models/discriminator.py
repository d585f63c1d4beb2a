"""PatchGAN discriminator (seed 000 FIG. 7 and "Discriminator (605)").

3x3 convolutions; batch norm with Keras momentum 0.8 (PyTorch momentum 0.2) after every
convolution but the first and the last; LeakyReLU 0.2; the first four convolutions have
stride 2 and padding 1, so a 256x224 input gives a 16x14 map of patch scores. A last 3x3
stride-1 convolution gives one score per patch (no sigmoid: the least-squares adversarial loss
takes raw scores).

The seeds do not say whether the discriminator sees the inputs; ``conditional=True`` (the
default, as pix2pix) stacks T1w and T2w with the real or synthetic CE image.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import LEAKY_SLOPE, width

#: Keras BatchNormalization(momentum=0.8) keeps 0.8 of the running statistics per step,
#: which is PyTorch's momentum=0.2.
BN_MOMENTUM = 0.2


class PatchGAN(nn.Module):
    """``forward(image, condition=None)`` -> (B, 1, H/16, W/16) patch scores."""

    def __init__(self, conditional: bool = True, condition_channels: int = 2,
                 width_multiplier: float = 1.0, image_channels: int = 1) -> None:
        """``image_channels``: the judged image's channels (1: a CE-T1w; CG-SAMR's painter
        is judged on its T1w, T2w and CE-T1w together)."""
        super().__init__()
        self.conditional = conditional
        self.config = {"conditional": conditional, "condition_channels": condition_channels,
                       "width_multiplier": width_multiplier}
        if image_channels != 1:  # recorded only when set: older checkpoints' configs match
            self.config["image_channels"] = image_channels
        channels = [width(c, width_multiplier) for c in (64, 128, 256, 512)]
        in_channels = image_channels + (condition_channels if conditional else 0)
        layers: list[nn.Module] = []
        for i, out in enumerate(channels):
            layers.append(nn.Conv2d(in_channels, out, 3, stride=2, padding=1, bias=(i == 0)))
            if i > 0:
                layers.append(nn.BatchNorm2d(out, momentum=BN_MOMENTUM))
            layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
            in_channels = out
        layers.append(nn.Conv2d(in_channels, 1, 3, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditional:
            if condition is None:
                raise ValueError("this discriminator is conditional: pass the T1w/T2w inputs")
            image = torch.cat([condition, image], dim=1)
        return self.net(image)
