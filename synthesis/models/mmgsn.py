"""MMgSN-Net generator (seed 000 "Examples (B)", FIG. 2 and FIG. 6; seed 001 Fig. 2).

Two inputs, axial T1w and T2w slices (B, 2, 256, 224), one output, the VCE-T1w slice.

- Multimodality learning module: one branch per modality, three convolution blocks (64, 128,
  256 features) and two 2x2 max-pool layers.
- Synergistic guidance: SGS1 fuses the branches' block-1 features (128 & 128 filters), SGS2
  their block-2 features (128 & 256). Features enter an SGS without pooling. Each SGS output
  is fed back, pooled to the next block's size, into the next block of *both* branches (the
  difference from Hi-Net); SGS1 also reaches block 3 through an additional pooling layer.
- Decoder ("synthesis network"): the two branches' block-3 features are concatenated and
  decoded by three convolution blocks (256, 128, 64 features) with bilinear upsampling
  between them; the SGS outputs join as skip connections at their scale (our reading of
  "fused features ... are passed forward to the decoder").
- Self-attention (SAGAN) between decoder blocks 2 and 3, at 128 x 112; keys and values are
  max-pooled 4x4 (to 32 x 28) so that the attention matrix per slice is 14336 x 896, not
  14336^2 (our choice: exact SAGAN there needs ~0.8 GB per slice and dominates CPU time).
- Multi-level module: every decoder block's output upsampled to the output size, concatenated,
  and a 1x1 convolution gives the image (tanh when targets are scaled to [-1, 1]).

Ablation switches as in the seed: ``fusion="concat"`` (SGS replaced by concatenation, which
keeps every channel count), ``multi_level=False`` (1x1 convolution on the last block only),
``attention=False``. ``width`` scales every channel count (0.25 gives the small CPU model).

``confidence=True`` adds seed 002's confidence guidance (CG-SAMR's synthesis and confidence
map modules) at half resolution, after the attention: an intermediate VCE and its per-pixel
confidence, whose product joins the last decoder block's input (the "confidence-masked
intermediate result" CG-SAMR feeds back). It also adds an error head at full resolution on
the last decoder block's features and the VCE (both detached: it never changes the VCE) that
predicts, per pixel, the expected absolute error of the VCE itself, trained with the same
loss as CG-SAMR's confidence (a Laplace likelihood: L_CM with c = lambda / b is
|y - y_hat| / b + log b up to constants; ``vcemri refit-confidence`` then teaches it, by
default, the error exceeded with probability 0.3 instead). ``forward(x, aux=True)`` also
returns the intermediate image, its confidence and the log expected error, for the training
losses and for the reviewer's map.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (
    Concatenation,
    ConfidenceGuidance,
    ConvBlock,
    SelfAttention,
    SynergisticGuidance,
    upsample,
    width,
)


class MMgSNNet(nn.Module):
    """The MMgSN-Net generator; ``forward`` takes (B, 2, H, W) = T1w, T2w; H, W multiples of 4."""

    inputs = ("t1w", "t2w")

    def __init__(
        self,
        width_multiplier: float = 1.0,
        fusion: Literal["sgs", "concat"] = "sgs",
        multi_level: bool = True,
        attention: bool = True,
        attention_pool: int = 4,
        output: Literal["tanh", "linear"] = "tanh",
        convs_per_block: int = 2,
        confidence: bool = False,
    ) -> None:
        super().__init__()
        c1, c2, c3 = (width(c, width_multiplier) for c in (64, 128, 256))
        self.config = {
            "width_multiplier": width_multiplier, "fusion": fusion, "multi_level": multi_level,
            "attention": attention, "attention_pool": attention_pool, "output": output,
            "convs_per_block": convs_per_block, "confidence": confidence,
        }
        if fusion == "sgs":
            self.sgs1: nn.Module = SynergisticGuidance(c1, c2, c2)  # SGS1: 128 & 128
            self.sgs2: nn.Module = SynergisticGuidance(c2, c2, c3)  # SGS2: 128 & 256
            f1, f2 = c2, c3
        else:
            self.sgs1 = Concatenation()
            self.sgs2 = Concatenation()
            f1, f2 = 2 * c1, 2 * c2  # equal to c2 and c3: the decoder is unchanged
        n = convs_per_block
        self.block1 = nn.ModuleList([ConvBlock(1, c1, n) for _ in range(2)])
        self.block2 = nn.ModuleList([ConvBlock(c1 + f1, c2, n) for _ in range(2)])
        self.block3 = nn.ModuleList([ConvBlock(c2 + f2 + f1, c3, n) for _ in range(2)])
        self.decode1 = ConvBlock(2 * c3, c3, n)
        self.decode2 = ConvBlock(c3 + f2, c2, n)
        self.attention = SelfAttention(c2, attention_pool) if attention else nn.Identity()
        self.guidance = ConfidenceGuidance(c2) if confidence else None
        self.decode3 = ConvBlock(c2 + f1 + (1 if confidence else 0), c1, n)
        self.error_head = nn.Sequential(
            ConvBlock(c1 + 1, max(4, c1 // 2), 1), nn.Conv2d(max(4, c1 // 2), 1, 3, padding=1),
        ) if confidence else None
        head_in = c3 + c2 + c1 if multi_level else c1
        self.head = nn.Conv2d(head_in, 1, 1)
        self.output_activation = nn.Tanh() if output == "tanh" else nn.Identity()
        self.multi_level = multi_level

    def forward(self, x: torch.Tensor, aux: bool = False) -> Any:
        """The VCE (B, 1, H, W); with ``aux`` (and the confidence module) also the
        half-resolution intermediate VCE, its confidence, and the log of the VCE's expected
        absolute error: (vce, intermediate, confidence, log_error)."""
        t1, t2 = x[:, 0:1], x[:, 1:2]
        a1, b1 = self.block1[0](t1), self.block1[1](t2)
        s1 = self.sgs1(a1, b1)
        s1_half = F.max_pool2d(s1, 2)
        a2 = self.block2[0](torch.cat([F.max_pool2d(a1, 2), s1_half], 1))
        b2 = self.block2[1](torch.cat([F.max_pool2d(b1, 2), s1_half], 1))
        s2 = self.sgs2(a2, b2)
        s2_quarter = F.max_pool2d(s2, 2)
        s1_quarter = F.max_pool2d(s1_half, 2)  # the additional pooling layer for SGS1
        a3 = self.block3[0](torch.cat([F.max_pool2d(a2, 2), s2_quarter, s1_quarter], 1))
        b3 = self.block3[1](torch.cat([F.max_pool2d(b2, 2), s2_quarter, s1_quarter], 1))

        d1 = self.decode1(torch.cat([a3, b3], 1))  # H/4
        d2 = self.decode2(torch.cat([upsample(d1), s2], 1))  # H/2
        d2 = self.attention(d2)
        intermediate = confidence = None
        guided = d2
        if self.guidance is not None:
            intermediate, confidence = self.guidance(d2)
            # kept in d2's memory layout: with a one-channel tensor the concatenation may
            # come out contiguous and every later convolution would convert it back
            guided = torch.cat([d2, intermediate * confidence], 1).contiguous(
                memory_format=torch.channels_last
                if d2.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        d3 = self.decode3(torch.cat([upsample(guided), s1], 1))  # H
        if self.multi_level:
            size = (d3.shape[-2], d3.shape[-1])
            features = torch.cat([upsample(d1, size), upsample(d2, size), d3], 1)
        else:
            features = d3
        vce = self.output_activation(self.head(features))
        if not aux:
            return vce
        log_error = None
        if self.error_head is not None:
            log_error = self.error_head(torch.cat([d3.detach(), vce.detach()], 1))
        return vce, intermediate, confidence, log_error
