"""Pretrain the embedded tiny base on general edits, so the general stream has a meaningful teacher.

A random transformer cannot even copy its input. A few minutes of flow matching on a family of
held-in general edits (identity, mild brightness and contrast) teaches it to read the
condition image and the instruction; effect LoRAs then only learn the difference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from collectionlora.effects import make_sources
from collectionlora.flowmatch import FlowBatch, fit
from collectionlora.models.backbone import Backbone

GeneralEdit = Callable[[torch.Tensor], torch.Tensor]

# Mild edits, deliberately weaker than the catalog's brighten/darken/contrast effects, so the
# general stream never looks like an effect to the judge.
GENERAL_EDITS: dict[str, GeneralEdit] = {
    "Keep the picture exactly as it is": lambda x: x,
    "Leave the image unchanged": lambda x: x,
    "Make the picture a little brighter": lambda x: x * 0.85 + 0.15,
    "Make the picture a little darker": lambda x: x * 0.8,
    "Add a touch more contrast": lambda x: ((x - 0.5) * 1.25 + 0.5).clamp(0, 1),
    "Soften the contrast slightly": lambda x: (x - 0.5) * 0.8 + 0.5,
}


def general_instructions() -> list[str]:
    return list(GENERAL_EDITS)


def apply_general_edit(instruction: str, images: torch.Tensor) -> torch.Tensor:
    if instruction not in GENERAL_EDITS:
        raise ValueError(f"unknown general edit {instruction!r}")
    return GENERAL_EDITS[instruction](images)


def general_batches(
    backbone: Backbone, pool_size: int, batch_size: int, seed: int, prompt_dropout: float, empty_prompt: str
) -> Callable[[torch.Generator], FlowBatch]:
    """Random (source, general edit) minibatches over a fixed pool of general-split sources.

    With probability `prompt_dropout` the instruction is replaced by `empty_prompt`, so that the base
    also learns the unconditional prediction classifier-free guidance needs.
    """
    pool = make_sources("general", pool_size, backbone.resolution, seed)
    instructions = general_instructions()
    condition = backbone.encode_images(pool)

    def next_batch(generator: torch.Generator) -> FlowBatch:
        rows = torch.randint(0, pool_size, (batch_size,), generator=generator)
        picks = torch.randint(0, len(instructions), (batch_size,), generator=generator).tolist()
        sources = pool[rows]
        targets = torch.cat([apply_general_edit(instructions[k], sources[i : i + 1]) for i, k in enumerate(picks)])
        dropped = (torch.rand(batch_size, generator=generator) < prompt_dropout).tolist()
        prompts = [empty_prompt if drop else instructions[k] for k, drop in zip(picks, dropped)]
        text = backbone.encode_prompts(prompts, sources)
        return FlowBatch(backbone.encode_images(targets), condition[rows], text)

    return next_batch


def pretrain_base(
    backbone: Backbone,
    steps: int,
    lr: float,
    batch_size: int,
    pool_size: int,
    seed: int,
    prompt_dropout: float,
    empty_prompt: str,
) -> list[float]:
    """Full fine-tune of the transformer on general edits; returns the loss curve."""
    parameters = list(backbone.transformer.parameters())
    for p in parameters:
        p.requires_grad_(True)
    try:
        batches = general_batches(backbone, pool_size, batch_size, seed, prompt_dropout, empty_prompt)
        return fit(backbone, parameters, batches, steps, lr, seed, "base pretraining")
    finally:
        for p in parameters:
            p.requires_grad_(False)
