"""Synthesis models: MMgSN-Net and its PatchGAN discriminator, the seed's baselines."""

from .discriminator import PatchGAN
from .gan_generators import Pix2PixUNet, ResnetGenerator
from .hinet import HiNet
from .mmgsn import MMgSNNet
from .registry import MODELS, build, parameter_count
from .unet import UNet

__all__ = ["MODELS", "HiNet", "MMgSNNet", "PatchGAN", "Pix2PixUNet", "ResnetGenerator", "UNet",
           "build", "parameter_count"]
