"""Flow-matching time utilities and the two samplers every stage uses.

Time convention (docs/method.md 2.1): timesteps t in (0, 1000], noise level sigma = t / 1000,
x_t = (1 - sigma) x0 + sigma * noise. The shift S(t) = 1000 * s*u / (1 + (s-1)*u), u = t/1000.

- Teacher: Euler over N shifted steps with classifier-free guidance: 2N transformer forwards (NFE)
  per image with CFG, N without.
- Student: predict x0 at each entry of an explicit step list, then re-noise to the next entry with
  fresh noise (DMD-style few-step sampling, no CFG): one forward per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from collectionlora.config import SamplingConfig
from collectionlora.models.backbone import Backbone


def shift_timestep(t: torch.Tensor | float, shift: float) -> torch.Tensor:
    """S(t) = 1000 * s*u / (1 + (s-1)*u) with u = t / 1000; identity for s = 1."""
    u = torch.as_tensor(t, dtype=torch.float64) / 1000.0
    return 1000.0 * shift * u / (1.0 + (shift - 1.0) * u)


def teacher_sigmas(steps: int, shift: float) -> torch.Tensor:
    """steps + 1 noise levels from 1 to 0: the uniform grid warped by the shift."""
    grid = torch.linspace(1000.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_timestep(grid, shift) / 1000.0


def student_timesteps(config: SamplingConfig, steps: int | None = None) -> list[float]:
    """The student's step list: params' explicit list, or for another length its shift-warped uniform grid.

    The reference's 8-step list is exactly the shift-3 warp of u = 1, 7/8, ..., 1/8, so other lengths
    (4, 2, 1) follow the same rule. With `truncate_timesteps` the values are floored like the
    reference's long tensor (954.5454 -> 954).
    """
    explicit = config.student_timesteps
    if steps is None or steps == len(explicit):
        values = list(explicit)
    else:
        if steps < 1:
            raise ValueError(f"student steps must be >= 1, got {steps}")
        grid = [1000.0 * (1 - k / steps) for k in range(steps)]
        values = [float(shift_timestep(t, config.shift)) for t in grid]
    return [float(int(t)) for t in values] if config.truncate_timesteps else values


def student_sigmas(timesteps: Sequence[float]) -> list[float]:
    """The noise levels of a student step list (sigma = t / 1000): what `sample_student` visits, and the
    `sigmas=` a stock diffusers call is given to visit the same ones."""
    return [float(t) / 1000.0 for t in timesteps]


@dataclass
class Samples:
    """Sampled images in [0, 1] (CPU float32), their packed latents, and transformer forwards per image."""

    images: torch.Tensor
    latents: torch.Tensor
    nfe: int


def item_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One generator per item, so a result does not depend on which batch the item was in."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def draw_noise(backbone: Backbone, like: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    return torch.cat([backbone.noise_like(like[i : i + 1], g) for i, g in enumerate(generators)])


@torch.no_grad()
def sample_teacher(
    backbone: Backbone,
    sources: torch.Tensor,
    prompts: list[str],
    seeds: Sequence[int],
    config: SamplingConfig,
    steps: int | None = None,
    cfg_scale: float | None = None,
) -> Samples:
    """Many-step Euler with CFG: the effect teachers' ("Base") sampler. Active adapters apply."""
    steps = steps or config.teacher_steps
    scale = config.teacher_cfg_scale if cfg_scale is None else cfg_scale
    condition = backbone.encode_images(sources)
    text = backbone.encode_prompts(prompts, sources)
    uncond = backbone.encode_prompts([config.negative_prompt] * len(prompts), sources) if scale != 1.0 else None
    sigmas = teacher_sigmas(steps, config.shift)
    x = draw_noise(backbone, condition, item_generators(seeds))
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        level = torch.full((x.shape[0],), float(sigma))
        v = backbone.guided_velocity(x, level, condition, text, uncond, scale, config.teacher_cfg_norm)
        x = x + float(sigma_next - sigma) * v
    nfe = steps * (2 if uncond is not None else 1)
    return Samples(backbone.decode_latents(x), x, nfe)


@torch.no_grad()
def sample_student(
    backbone: Backbone,
    sources: torch.Tensor,
    prompts: list[str],
    seeds: Sequence[int],
    timesteps: Sequence[float],
) -> Samples:
    """Few-step x0-prediction sampler over an explicit step list (no CFG). Active adapters apply."""
    condition = backbone.encode_images(sources)
    text = backbone.encode_prompts(prompts, sources)
    generators = item_generators(seeds)
    x = draw_noise(backbone, condition, generators)
    sigmas = student_sigmas(timesteps)
    for i, sigma in enumerate(sigmas):
        level = torch.full((x.shape[0],), sigma)
        x0 = backbone.predict_x0(x, level, backbone.velocity(x, level, condition, text))
        if i + 1 < len(sigmas):
            x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * draw_noise(backbone, condition, generators)
        else:
            x = x0
    return Samples(backbone.decode_latents(x), x, len(sigmas))
