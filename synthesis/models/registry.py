"""One registry for every generator and discriminator, so that training, checkpoints and
inference name models the same way and later seed models (IMPORTANT-Net, CG-SAMR) slot in.

Every generator takes a (B, len(model.inputs), H, W) tensor of the input modalities in the
order of ``model.inputs`` and returns (B, 1, H, W); ``model.config`` holds the keyword
arguments that rebuild it (stored in checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .discriminator import PatchGAN
from .gan_generators import Pix2PixUNet, ResnetGenerator
from .hinet import HiNet
from .mmgsn import MMgSNNet
from .unet import UNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mmgsn": MMgSNNet,
    "unet": UNet,
    "hinet": HiNet,
    "pix2pix": Pix2PixUNet,
    "cyclegan": ResnetGenerator,
    "patchgan": PatchGAN,
}


def build(name: str, **config: Any) -> nn.Module:
    """Build the model ``name`` with keyword arguments ``config``."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r} (known: {', '.join(MODELS)})") from None
    model = factory(**config)
    model.registry_name = name  # type: ignore[assignment]
    return model


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
