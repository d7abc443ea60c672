"""Pixel fidelity against a reference image: what "matches the ground truth" means for deterministic effects."""

from __future__ import annotations

import torch


def psnr(images: torch.Tensor, references: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Per-image PSNR in dB for [B, 3, H, W] tensors in [0, 1]."""
    if images.shape != references.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(images.shape)} vs {tuple(references.shape)}")
    mse = ((images.float() - references.float()) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / (mse + eps))
