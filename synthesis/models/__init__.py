"""Synthesis models: MMgSN-Net and its PatchGAN discriminator, the seed's baselines, and the
registry that names them (readable without loading torch)."""

from config import lazy_attributes

from .registry import (
                       DISCRIMINATORS,
                       GENERATORS,
                       MODELS,
                       PAINTERS,
                       build,
                       model_class,
                       parameter_count,
)

_CLASSES = {"CGSAMR": "cgsamr", "FitnessNet": "fitness", "HiNet": "hinet", "MMgSNNet": "mmgsn",
            "PatchGAN": "discriminator",
            "Pix2PixUNet": "gan_generators", "ResnetGenerator": "gan_generators",
            "UNet": "unet"}


__getattr__ = lazy_attributes(__name__, _CLASSES)

__all__ = ["DISCRIMINATORS", "GENERATORS", "MODELS", "PAINTERS", "build", "model_class",
           "parameter_count", *_CLASSES]
