"""Pixel fidelity against a reference image: what "matches the ground truth" means for deterministic effects."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from collectionlora.effects import catalog
from collectionlora.effects.base import stable_seed
from collectionlora.evaluate.judge import EffectJudge


def psnr(images: torch.Tensor, references: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Per-image PSNR in dB for [B, 3, H, W] tensors in [0, 1]."""
    if images.shape != references.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(images.shape)} vs {tuple(references.shape)}")
    mse = ((images.float() - references.float()) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / (mse + eps))


Editor = Callable[[str, torch.Tensor, list[int]], torch.Tensor]


def effect_fidelity(
    edit: Editor,
    effect_ids: Sequence[str],
    sources: torch.Tensor,
    judge: EffectJudge,
    seed: int,
    references: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Per effect: the judge's verdict rate on `edit`'s outputs, PSNR to the procedural ground truth for
    deterministic catalog effects, and PSNR to `references[effect]` (e.g. the teacher's edits) when
    given. `edit(effect_id, sources, seeds)` returns images in [0, 1]. Also returns the edits."""
    known = catalog()
    report, edits = {}, {}
    for effect_id in effect_ids:
        seeds = [stable_seed("fidelity", seed, effect_id, i) for i in range(len(sources))]
        images = edit(effect_id, sources, seeds)
        verdicts = judge.predict(sources, images)
        row: dict = {"judge_rate": sum(v == effect_id for v in verdicts) / len(verdicts)}
        effect = known.get(effect_id)
        if effect is not None and not effect.stochastic:
            row["psnr_truth_db"] = float(psnr(images, effect.apply(sources, 0)).mean())
        if references is not None:
            row["psnr_reference_db"] = float(psnr(images, references[effect_id]).mean())
        report[effect_id], edits[effect_id] = row, images
    return report, edits
