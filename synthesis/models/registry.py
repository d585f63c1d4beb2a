"""One registry for every generator and discriminator, so that training, checkpoints, the CLI
and inference name models the same way and later seed models (IMPORTANT-Net, CG-SAMR) slot in.

Every generator takes a (B, len(model.inputs), H, W) tensor of the input modalities in the
order of ``model.inputs`` and returns (B, 1, H, W); ``model.config`` holds the keyword
arguments that rebuild it (stored in checkpoints).

The registry names each model's class by its import path and imports it on first use, so that
reading the names (``vcemri --help``) does not load torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

#: Registry name -> "module:Class" under synthesis.models.
MODELS: dict[str, str] = {
    "mmgsn": "mmgsn:MMgSNNet",
    "unet": "unet:UNet",
    "hinet": "hinet:HiNet",
    "important": "important:ImportantNet",
    "pix2pix": "gan_generators:Pix2PixUNet",
    "cyclegan": "gan_generators:ResnetGenerator",
    "patchgan": "discriminator:PatchGAN",
    "fitness": "fitness:FitnessNet",
    "cgsamr": "cgsamr:CGSAMR",
}

#: Models that judge images rather than make them: the adversary, the fitness classifier.
DISCRIMINATORS = ("patchgan", "fitness")
#: Models that paint lesions into training slices (seed 002's CG-SAMR as an augmentation
#: source): ``vcemri train --architecture`` accepts them, the node never loads them.
PAINTERS = ("cgsamr",)
#: Models that make a CE-T1w from input modalities: what ``vcemri train --architecture``
#: accepts besides the painters and what a checkpoint's architecture names.
GENERATORS = tuple(name for name in MODELS if name not in (*DISCRIMINATORS, *PAINTERS))


def model_class(name: str) -> type[nn.Module]:
    """The class registered as ``name``."""
    try:
        module, _, attribute = MODELS[name].partition(":")
    except KeyError:
        raise KeyError(f"unknown model {name!r} (known: {', '.join(MODELS)})") from None
    return getattr(import_module(f"{__package__}.{module}"), attribute)  # type: ignore[no-any-return]


def build(name: str, **config: Any) -> nn.Module:
    """Build the model ``name`` with keyword arguments ``config``."""
    model = model_class(name)(**config)
    model.registry_name = name  # type: ignore[assignment]
    return model


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
