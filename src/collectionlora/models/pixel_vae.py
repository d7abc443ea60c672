"""A weight-free, exact pixel-shuffle "VAE" for the embedded tiny pipeline.

A random AutoencoderKLQwenImage does not reconstruct, and training one would cap every PSNR at its
reconstruction quality. Pixel-unshuffle is lossless, needs no weights, and keeps the packed token
width (4 * 3 * factor^2) small enough for a tiny transformer to copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin


class PixelShuffleLatents:
    """What `retrieve_latents` expects from `vae.encode(...)`: an object with `.latents`."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents


class PixelShuffleVAE(ModelMixin, ConfigMixin):
    """encode = 5-D pixel_unshuffle, decode = pixel_shuffle; config mimics AutoencoderKLQwenImage."""

    @register_to_config
    def __init__(
        self,
        factor: int = 2,
        z_dim: int = 12,
        latents_mean: tuple[float, ...] = (0.0,) * 12,
        latents_std: tuple[float, ...] = (0.5,) * 12,
        temperal_downsample: tuple[bool, ...] = (False,),
    ):
        super().__init__()
        if z_dim != 3 * factor * factor or len(temperal_downsample) != int(math.log2(factor)):
            raise ValueError(f"PixelShuffleVAE: factor {factor} needs z_dim {3 * factor**2}, log2(factor) flags")
        # diffusers saves no weight file for a parameter-free model and then cannot reload it.
        self.register_buffer("format_version", torch.ones(1))
        # The pipeline reads `vae.temperal_downsample` as an attribute to derive its scale factor.
        self.temperal_downsample = list(temperal_downsample)

    @classmethod
    def for_factor(cls, factor: int) -> PixelShuffleVAE:
        channels = 3 * factor * factor
        return cls(factor, channels, (0.0,) * channels, (0.5,) * channels, (False,) * int(math.log2(factor)))

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> PixelShuffleLatents:
        batch, channels, frames, height, width = x.shape
        flat = x.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        latents = F.pixel_unshuffle(flat, self.config.factor)
        latents = latents.reshape(batch, frames, *latents.shape[1:]).permute(0, 2, 1, 3, 4)
        return PixelShuffleLatents(latents)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        batch, channels, frames, height, width = z.shape
        flat = z.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        image = F.pixel_shuffle(flat, self.config.factor)
        image = image.reshape(batch, frames, *image.shape[1:]).permute(0, 2, 1, 3, 4)
        return DecoderOutput(sample=image) if return_dict else (image,)
