"""Timestep draws of C2F-DO (docs/method.md 5.2-5.4) and counter-based random numbers.

Every random draw of a training step comes from a generator seeded by (seed, step, purpose, global
item index): a step's randomness is a pure function of where it is, so resuming needs no RNG
state, and an item gets the same draws whichever rank or batch it lands in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from collectionlora.effects.base import stable_seed
from collectionlora.sampling import shift_timestep

GRID = 1000  # the scheduler's identity grid: timesteps 1..1000, sigma = t / 1000


def generator(seed: int, step: int, purpose: str, item: int = -1) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed("distill", seed, step, purpose, item))


def uniform_items(seed: int, step: int, purpose: str, items: Sequence[int]) -> torch.Tensor:
    """One U(0, 1) per item, float64."""
    return torch.tensor(
        [float(torch.rand(1, generator=generator(seed, step, purpose, i), dtype=torch.float64)) for i in items],
        dtype=torch.float64,
    )


def noise_items(seed: int, step: int, purpose: str, items: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like one item of `like`, per item, drawn on CPU."""
    shape = like.shape[1:]
    rows = [torch.randn(shape, generator=generator(seed, step, purpose, i)) for i in items]
    return torch.stack(rows).to(like.device, like.dtype)


def shifted_uniform(u: torch.Tensor, low: float, high: float, shift: float) -> torch.Tensor:
    """S(U{low, ..., high-1}) on the integer grid, then clamped to [1, 1000] (add_noise's grid)."""
    t = torch.floor(low + u * (high - low)).clamp(max=high - 1)
    return shift_timestep(t, shift).clamp(1, GRID)


def critic_timesteps(u: torch.Tensor, low: float, high: float, shift: float) -> torch.Tensor:
    """DMD critic time: S(U[0, 1000)) for BS-DMD; S(U[500, 1000)) for TS-DMD (pre-shift bounds)."""
    return shifted_uniform(u, low, high, shift)


def generator_index(u: torch.Tensor, steps: int) -> torch.Tensor:
    """j ~ U{0, ..., steps-1}: where on the student's step list the generator is trained."""
    return torch.floor(u * steps).long().clamp(max=steps - 1)


def ts_generator_timesteps(u: torch.Tensor, step_list: Sequence[float], last: int) -> torch.Tensor:
    """TS generator time: uniform over the last `last` entries of the step list (paper: t_gen < tau_max)."""
    choices = torch.tensor(list(step_list)[-last:], dtype=torch.float64)
    return choices[torch.floor(u * len(choices)).long().clamp(max=len(choices) - 1)]


def ta_fm_timesteps(u: torch.Tensor, mode: str, bs_timesteps: torch.Tensor, shift: float) -> torch.Tensor:
    """TA-FM time. paper: S(U[0, 1000)), a standard flow-matching draw; reference: shifted twice and
    bounded below by this step's (already shifted) BS-DMD critic time: S(U[floor(t_bs), 1000))."""
    if mode == "paper":
        return shifted_uniform(u, 0, GRID, shift)
    low = torch.floor(bs_timesteps).clamp(max=GRID - 1)
    t = torch.floor(low + u * (GRID - low)).clamp(max=GRID - 1)
    return shift_timestep(t, shift).clamp(1, GRID)


def lr_factor(kind: str, step: int, total_steps: int) -> float:
    """The learning-rate multiplier at `step` of a `total_steps` run: constant 1, or a cosine from 1 to 0."""
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    raise ValueError(f"unknown learning-rate schedule {kind!r}")
