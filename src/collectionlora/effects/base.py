"""The Effect record and the per-item randomness that stochastic effects draw from."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from its parts via blake2b: unlike hash(), identical across runs and machines."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


class ItemRandom:
    """One generator per batch item, seeded from (seed, index): item i's randomness ignores the batch size.

    Every draw returns a [B, *shape] tensor, so effects stay vectorised while items differ.
    """

    def __init__(self, seed: int, batch: int) -> None:
        self._generators = [torch.Generator().manual_seed(stable_seed("effect", seed, i)) for i in range(batch)]

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        draws = torch.stack([torch.rand(shape, generator=g) for g in self._generators])
        return low + (high - low) * draws

    def normal(self, *shape: int) -> Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self._generators])

    def integers(self, high: int, *shape: int) -> Tensor:
        return torch.stack([torch.randint(high, shape, generator=g) for g in self._generators])


DeterministicTransform = Callable[[Tensor], Tensor]
StochasticTransform = Callable[[Tensor, ItemRandom], Tensor]


@dataclass(frozen=True)
class Effect:
    """A ground-truth image edit and the teacher instruction that names it."""

    id: str
    category: str
    prompt: str
    stochastic: bool
    transform: DeterministicTransform | StochasticTransform

    def apply(self, images: Tensor, seed: int) -> Tensor:
        """Edit a [B, 3, H, W] batch in [0, 1]; the output depends only on (images, seed)."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"effect {self.id}: expected a float [B, 3, H, W] batch, got {tuple(images.shape)}")
        if self.stochastic:
            out = self.transform(images, ItemRandom(seed, images.shape[0]))
        else:
            out = self.transform(images)
        return out.clamp(0.0, 1.0)
