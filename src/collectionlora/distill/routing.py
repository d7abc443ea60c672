"""Probabilistic Dual-Stream Routing (PDSR, docs/method.md 3).

Each step trains on the effect stream (a teacher effect LoRA, its targets, C2F-DO) with probability
p_switch, else on the general stream (the frozen base as teacher, general images, BS-DMD only).
The draw is a pure function of (seed, block of `route_every` steps, rank when unsynchronised), so
it is identical on every rank without communication and needs no state to resume.
"""

from __future__ import annotations

from typing import Literal

import torch

from collectionlora.config import DistillConfig
from collectionlora.effects.base import stable_seed

Stream = Literal["effect", "general"]
EFFECT: Stream = "effect"
GENERAL: Stream = "general"


class StreamRouter:
    """Which stream step s trains on. With PDSR off every step is an effect step (ablation)."""

    def __init__(self, config: DistillConfig, rank: int):
        self.enabled = config.pdsr
        self.p_switch = config.p_switch
        self.route_every = config.route_every
        self.seed = config.seed
        self.rank = 0 if config.sync_routing else rank

    def stream(self, step: int) -> Stream:
        if not self.enabled:
            return EFFECT
        block = step // self.route_every
        generator = torch.Generator().manual_seed(stable_seed("pdsr", self.seed, block, self.rank))
        draw = float(torch.rand(1, generator=generator, dtype=torch.float64))
        return EFFECT if draw < self.p_switch else GENERAL
