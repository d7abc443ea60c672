"""The C2F-DO loss terms and the critic's loss, as pure functions of tensors (docs/method.md 5.1-5.6).

Conventions: packed latents [B, tokens, channels]; sigma = t / 1000 per item; x_t = (1 - sigma) x0
+ sigma * noise; networks predict the velocity v = noise - x0, so x0 = x_t - sigma * v.
"""

from __future__ import annotations

import torch


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma * noise, sigma one value per item."""
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def dmd_gradient(x: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """The DMD direction (s_fake - s_real) in x0 space, divided by the reference's per-item normaliser
    mean|x - real_x0| (computed in float64; non-finite entries become 0 like the reference's nan_to_num)."""
    x, fake, real = x.detach().double(), fake_x0.detach().double(), real_x0.detach().double()
    weight = (x - real).abs().mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return torch.nan_to_num((fake - real) / weight)


def dmd_loss(x: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor) -> torch.Tensor:
    """0.5 * mean((x - stopgrad(x - g))^2): its gradient with respect to x is g / numel (docs/method.md 5.1)."""
    gradient = dmd_gradient(x, fake_x0, real_x0)
    x64 = x.double()
    target = (x64 - gradient).detach()
    return 0.5 * torch.mean((x64 - target) ** 2)


def flow_matching_loss(velocity: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """mean((v - (noise - x0))^2): TA-FM (x0 = the teacher target) and the critic (x0 = a student sample).

    Equal to the reference's mean(((x_t - x0_pred)/sigma - (noise - x0))^2) without dividing by sigma.
    """
    return torch.mean((velocity.float() - (noise - x0).float()) ** 2)
