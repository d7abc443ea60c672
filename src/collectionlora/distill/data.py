"""The two streams' data, encoded once: source latents, target latents and every text embedding.

Batches are chosen by counter-based draws (see schedule.py): the global batch of a step is the same
whatever the number of processes, and each rank takes its slice of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from collectionlora.adapters import NONE
from collectionlora.distill import schedule
from collectionlora.distill.routing import EFFECT, GENERAL, Stream
from collectionlora.effects.base import stable_seed
from collectionlora.models.backbone import Backbone, PromptEmbeds


@dataclass
class StepBatch:
    """One rank's share of a step; `teachers[i]` is the adapter that scores row i: its effect's teacher,
    or NONE (the frozen base) in the general stream."""

    stream: Stream
    teachers: list[str]
    condition: torch.Tensor
    student_text: PromptEmbeds
    teacher_text: PromptEmbeds
    uncond_text: PromptEmbeds
    target: torch.Tensor | None
    items: list[int]


@dataclass
class _EncodedEffect:
    condition: torch.Tensor
    target: torch.Tensor
    student: list[torch.Tensor]
    teacher: list[torch.Tensor]
    uncond: list[torch.Tensor]


class EffectSchedule:
    """Which effect an effect-stream step uses: round robin over `effects` in a fresh seeded order each
    epoch; with `replay` > 0 that share of steps instead revisits one of `old` (incremental add)."""

    def __init__(self, effects: Sequence[str], old: Sequence[str], replay: float, seed: int):
        self.effects, self.old, self.replay, self.seed = list(effects), list(old), replay if old else 0.0, seed

    def pick(self, position: int) -> str:
        if not self.effects:
            raise ValueError("an effect-stream step with no effects to distil")
        generator = torch.Generator().manual_seed(stable_seed("effect-pick", self.seed, position))
        if self.replay and float(torch.rand(1, generator=generator, dtype=torch.float64)) < self.replay:
            return self.old[int(torch.randint(len(self.old), (1,), generator=generator))]
        epoch, index = divmod(position, len(self.effects))
        order = torch.randperm(len(self.effects), generator=torch.Generator().manual_seed(stable_seed("epoch", self.seed, epoch)))
        return self.effects[int(order[index])]


class DistillData:
    """Encoded effect rollouts (per effect) and general sources with their instructions."""

    def __init__(
        self,
        backbone: Backbone,
        effects: dict[str, tuple[torch.Tensor, torch.Tensor, str, str]],
        general_sources: torch.Tensor,
        instructions: Sequence[str],
        negative_prompt: str,
    ):
        """`effects`: id -> (sources, targets, teacher prompt, student prompt)."""
        self.backbone = backbone
        self.negative_prompt = negative_prompt
        self._effects: dict[str, _EncodedEffect] = {}
        for effect_id, (sources, targets, teacher_prompt, student_prompt) in effects.items():
            count = len(sources)
            self._effects[effect_id] = _EncodedEffect(
                condition=backbone.encode_images(sources),
                target=backbone.encode_images(targets),
                student=backbone.encode_prompts([student_prompt] * count, sources).unpadded(),
                teacher=backbone.encode_prompts([teacher_prompt] * count, sources).unpadded(),
                uncond=backbone.encode_prompts([negative_prompt] * count, sources).unpadded(),
            )
        self.general_sources = general_sources
        self.instructions = list(instructions)
        self._general_condition = backbone.encode_images(general_sources) if len(general_sources) else None
        self._general_uncond = (
            backbone.encode_prompts([negative_prompt] * len(general_sources), general_sources).unpadded()
            if len(general_sources)
            else []
        )

    @property
    def student_text_length(self) -> int:
        """Tokens of the longest student prompt state: the anchor phase pads every batch to it."""
        return max(row.shape[0] for data in self._effects.values() for row in data.student)

    def batch(self, stream: Stream, row_effects: Sequence[str] | None, step: int, seed: int, items: list[int]) -> StepBatch:
        """Rows for this rank's `items` of the step's global batch, drawn per item (rank-independent);
        in the effect stream `row_effects[i]` is the effect of `items[i]`."""
        if stream == EFFECT:
            if row_effects is None or len(row_effects) != len(items):
                raise ValueError("an effect-stream batch needs one effect per item")
            return self._effect_batch(list(row_effects), step, seed, items)
        if stream == GENERAL:
            return self._general_batch(step, seed, items)
        raise ValueError(f"unknown stream {stream!r}")

    def _rows(self, count: int, step: int, seed: int, purpose: str, items: list[int]) -> list[int]:
        return [int(u * count) % count for u in schedule.uniform_items(seed, step, purpose, items).tolist()]

    def _effect_batch(self, row_effects: list[str], step: int, seed: int, mine: list[int]) -> StepBatch:
        unknown = sorted(set(row_effects) - set(self._effects))
        if unknown:
            raise KeyError(f"no rollouts for effect {unknown[0]!r}")
        rows = [
            self._rows(len(self._effects[effect].condition), step, seed, f"rows-{effect}", [item])[0]
            for effect, item in zip(row_effects, mine)
        ]
        encoded = [self._effects[effect] for effect in row_effects]
        return StepBatch(
            stream=EFFECT,
            teachers=list(row_effects),
            condition=torch.stack([data.condition[r] for data, r in zip(encoded, rows)]),
            student_text=PromptEmbeds.stack([data.student[r] for data, r in zip(encoded, rows)]),
            teacher_text=PromptEmbeds.stack([data.teacher[r] for data, r in zip(encoded, rows)]),
            uncond_text=PromptEmbeds.stack([data.uncond[r] for data, r in zip(encoded, rows)]),
            target=torch.stack([data.target[r] for data, r in zip(encoded, rows)]),
            items=mine,
        )

    def _general_batch(self, step: int, seed: int, mine: list[int]) -> StepBatch:
        if self._general_condition is None:
            raise ValueError("the general stream needs general sources")
        rows = self._rows(len(self.general_sources), step, seed, "rows-general", mine)
        which = self._rows(len(self.instructions), step, seed, "instruction", mine)
        prompts = [self.instructions[w] for w in which]
        pick = torch.tensor(rows)
        text = self.backbone.encode_prompts(prompts, self.general_sources[pick])
        return StepBatch(
            stream=GENERAL,
            teachers=[NONE] * len(mine),
            condition=self._general_condition[pick],
            student_text=text,
            teacher_text=text,
            uncond_text=PromptEmbeds.stack([self._general_uncond[r] for r in rows]),
            target=None,
            items=mine,
        )
