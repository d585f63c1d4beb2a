"""IMPORTANT-Net (seed 003): synthesis from any set of input sequences.

Three modules, as seed 003 section 3 describes them:

1. **Parameter reconstruction** (3.1): one autoencoder per input sequence ("parameter"),
   four down-sampling levels (64, 128, 256, 512 filters) and four up-sampling levels back to
   the input, whose reconstruction is trained with an L1 loss (eq. 1); its down-sampling
   features P_i^dn and up-sampling features P_i^um are what the other modules fuse.
2. **Multi-parameter fusion with attention, MPFA** (3.2, Fig. 2): the "interaction room"
   combines the parameters' features element-wise by the MAPS strategy (maximum, average,
   product and subtraction); the features before and after the interaction are
   concatenated (P_concat), weighted by a parameter-level channel attention (average- and
   max-pooled, a shared two-layer fully connected network, summed, sigmoid: eq. 2), added to
   P_concat, passed through Conv1, concatenated with the previous MPFA's resampled output
   F'_{k-1} and passed through Conv2.
3. **Hierarchical V-shape generation** (3.3, Fig. 3): MPFA1-4 fuse P_i^d1..d4 (the "analysis
   path", each fed max-pooled to the next), two 3x3 convolutions of 1024 and 512 filters at
   the bottom, MPFA5-8 fuse P_i^u1..u4 with the analysis path's output at the same scale
   (skip connections) and the previous MPFA's upsampled output (the "synthesis path"); a
   1x1 convolution gives the target.

Where the seed is silent, the choices made here:
- with more than two parameters, product and subtraction are taken over every pair (mean of
  a_i * a_j and of |a_i - a_j|, i < j), maximum and average over all present ones;
- the attention's hidden layer has C/16 units (the CBAM reduction the figure resembles);
- each "Conv" is a convolution block of this package (3x3 conv, batch norm, LeakyReLU);
- **absent parameters** (seed 003's point: synthesis from whatever was acquired): ``forward``
  takes ``present``, which inputs were acquired; an absent one's features are zeros in
  P_concat and it takes no part in MAPS, so one checkpoint serves any non-empty subset of its
  trained inputs when trained with modality dropout (training's concern).

``forward(x, reconstruct=True)`` also returns each input's reconstruction, so that every
parameter takes part in a training step (DistributedDataParallel needs that) and the seed's
reconstruction loss (weight :data:`RECONSTRUCTION_WEIGHT`) comes from one pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvBlock, upsample, width

#: Seed 003 section 4.1: lambda_1 (L1) 100, lambda_2 (reconstruction) 25, lambda_3
#: (perceptual) 200. The reconstruction loss's weight, relative to the adversarial loss's 1.
RECONSTRUCTION_WEIGHT = 25.0

#: Filters of the four levels (seed 003 Fig. 1 and 3), and of the bottom's two convolutions.
LEVELS = (64, 128, 256, 512)
BOTTOM = (1024, 512)

#: The channel attention's reduction (hidden units C / REDUCTION).
REDUCTION = 16


class ParameterReconstructor(nn.Module):
    """One input sequence's autoencoder (seed 003 3.1): P^d1..d4 going down, P^u1..u4 coming
    back up (u1 at the deepest scale, u4 at the input's), and the reconstruction."""

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.down = nn.ModuleList(ConvBlock(1 if i == 0 else sizes[i - 1], s)
                                  for i, s in enumerate(sizes))
        reverse = list(reversed(sizes))
        self.up = nn.ModuleList(ConvBlock(reverse[max(0, i - 1)], s)
                                for i, s in enumerate(reverse))
        self.head = nn.Conv2d(sizes[0], 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                 torch.Tensor]:
        down: list[torch.Tensor] = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            down.append(x)
        up: list[torch.Tensor] = []
        for i, block in enumerate(self.up):
            x = block(x if i == 0 else upsample(x, down[-1 - i].shape[-2:]))
            up.append(x)
        return down, up, self.head(x)


class ParameterAttention(nn.Module):
    """Seed 003 eq. 2: sigmoid(fc(AvePool(P)) + fc(MaxPool(P))), one weight per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(4, channels // REDUCTION)
        self.fc = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1))
                             + self.fc(F.adaptive_max_pool2d(x, 1)))


def maps(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The MAPS interaction of the present parameters' features (each (B, C, H, W)):
    maximum, average, product and subtraction (over every pair; with one parameter its
    square and zero)."""
    stacked = torch.stack(list(features))
    pairs = list(combinations(range(len(features)), 2))
    if pairs:
        product = torch.stack([features[i] * features[j] for i, j in pairs]).mean(0)
        difference = torch.stack([(features[i] - features[j]).abs() for i, j in pairs]).mean(0)
    else:
        product, difference = features[0] * features[0], torch.zeros_like(features[0])
    return [stacked.amax(0), stacked.mean(0), product, difference]


class MPFA(nn.Module):
    """Multi-parameter fusion with attention (seed 003 3.2, Fig. 2) for ``count`` parameters
    of ``channels`` features each; ``previous``: the channels of F'_{k-1} (and skip) that
    Conv2 takes beside Conv1's output (0 for MPFA1)."""

    def __init__(self, count: int, channels: int, previous: int, out_channels: int) -> None:
        super().__init__()
        concatenated = (count + 4) * channels
        self.attention = ParameterAttention(concatenated)
        self.conv1 = ConvBlock(concatenated, out_channels)
        self.conv2 = ConvBlock(out_channels + previous, out_channels)

    def forward(self, features: Sequence[torch.Tensor], present: Sequence[bool],
                previous: torch.Tensor | None = None) -> torch.Tensor:
        kept = [f if p else torch.zeros_like(f) for f, p in zip(features, present, strict=True)]
        acquired = [f for f, p in zip(features, present, strict=True) if p]
        concatenated = torch.cat([*kept, *maps(acquired)], 1)
        refined = concatenated * self.attention(concatenated)
        fused = self.conv1(concatenated + refined)
        if previous is not None:
            fused = torch.cat([fused, previous], 1)
        return self.conv2(fused)


class ImportantNet(nn.Module):
    """``forward`` takes (B, len(inputs), H, W), H and W multiples of 16, and ``present`` (one
    flag per input; default all); returns (B, 1, H, W), with ``reconstruct`` also each
    input's reconstruction (in the inputs' units; absent ones too: training has their
    images)."""

    #: the seed's reconstruction loss weight, read by training (Hi-Net's is 20)
    reconstruction_weight = RECONSTRUCTION_WEIGHT

    def __init__(self, inputs: Sequence[str] = ("t1w", "t2w"), width_multiplier: float = 1.0,
                 output: Literal["tanh", "linear"] = "tanh", accepts_subsets: bool = False
                 ) -> None:
        super().__init__()
        self.inputs = tuple(inputs)
        if not self.inputs:
            raise ValueError("IMPORTANT-Net needs at least one input sequence")
        #: trained with modality dropout: any non-empty subset of ``inputs`` may be given
        #: (else every input is needed)
        self.accepts_subsets = accepts_subsets
        self.config = {"inputs": list(self.inputs), "width_multiplier": width_multiplier,
                       "output": output, "accepts_subsets": accepts_subsets}
        sizes = [width(c, width_multiplier) for c in LEVELS]
        bottom = [width(c, width_multiplier) for c in BOTTOM]
        n = len(self.inputs)
        self.reconstructors = nn.ModuleList(ParameterReconstructor(sizes) for _ in self.inputs)
        # analysis path: MPFA1-4 on P^d1..d4, each taking the previous one max-pooled
        self.analysis = nn.ModuleList(MPFA(n, s, sizes[i - 1] if i else 0, s)
                                      for i, s in enumerate(sizes))
        self.bottom = nn.Sequential(ConvBlock(sizes[-1], bottom[0], 1),
                                    ConvBlock(bottom[0], bottom[1], 1))
        # synthesis path: MPFA5-8 on P^u1..u4 (deepest first), each taking the previous one
        # upsampled and the analysis path's output at its scale
        reverse = list(reversed(sizes))
        self.synthesis = nn.ModuleList(
            MPFA(n, s, (bottom[1] if i == 0 else reverse[i - 1]) + s, s)
            for i, s in enumerate(reverse))
        self.head = nn.Conv2d(sizes[0], 1, 1)
        self.output_activation = nn.Tanh() if output == "tanh" else nn.Identity()

    def forward(self, x: torch.Tensor, reconstruct: bool = False,
                present: Sequence[bool] | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        flags = [True] * len(self.inputs) if present is None else [bool(p) for p in present]
        if len(flags) != len(self.inputs) or not any(flags):
            raise ValueError(f"present must flag at least one of the {len(self.inputs)} inputs")
        # reconstructing (training), every input is encoded and reconstructed, absent or not:
        # every parameter learns in every step; fusion still leaves the absent ones out
        encoded = [r(x[:, i:i + 1]) if flags[i] or reconstruct else None
                   for i, r in enumerate(self.reconstructors)]
        template = next(e for e in encoded if e is not None)
        down = [[(e or template)[0][k] for e in encoded] for k in range(len(self.analysis))]
        up = [[(e or template)[1][k] for e in encoded] for k in range(len(self.synthesis))]
        analysed: list[torch.Tensor] = []
        for k, block in enumerate(self.analysis):
            previous = F.max_pool2d(analysed[-1], 2) if analysed else None
            analysed.append(block(down[k], flags, previous))
        y = self.bottom(F.max_pool2d(analysed[-1], 2))
        for k, block in enumerate(self.synthesis):
            skip = analysed[-1 - k]
            y = block(up[k], flags, torch.cat([upsample(y, skip.shape[-2:]), skip], 1))
        y = self.output_activation(self.head(y))
        if not reconstruct:
            return y
        return (y, *(self.output_activation(e[2]) if e is not None else None for e in encoded))

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Each input's reconstruction (the seed's auxiliary loss)."""
        return self(x, reconstruct=True)[1:]  # type: ignore[index,return-value]
