"""The alternatives a user would otherwise ship, built from the same bank and rollouts as the student:

- "FM all-in-1": one LoRA fitted by plain flow matching to every teacher target, each with its effect's
  student prompt (what the paper trains as "50-in-1 (FM)"): the same data, none of the distillation;
- "PEFT merges": the teacher LoRAs merged into one (merging.py: linear, ties, dare_ties, svd, cat).

Both are sampled by the evaluation with the bank's acceleration LoRA stacked on them at 8 NFE. They are
a stage of their own so that a new student does not retrain them: they depend on the rollouts and on the
student prompts (prompts.json), not on the student's weights.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from collectionlora.adapters import AdapterSet
from collectionlora.bank import Bank, file_sha256
from collectionlora.config import FmAllInOneConfig, Params, SamplingConfig
from collectionlora.distill.export import LORA_WEIGHTS, export_student
from collectionlora.distill.prompting import PromptPlan
from collectionlora.flowmatch import fit, pair_batches
from collectionlora.lorafile import atomic_write_text, base_linear_shapes
from collectionlora.merging import write_merges
from collectionlora.models.backbone import Backbone
from collectionlora.rollout import EffectRollouts

FM_ALL_IN_ONE = "fm_all_in_one"
MERGES = "merges"
REPORT = "baselines.json"
_TRAINING = "fm_all_in_one_training"


def train_fm_all_in_one(
    backbone: Backbone,
    rollouts: dict[str, EffectRollouts],
    plan: PromptPlan,
    config: FmAllInOneConfig,
    targets: list[str],
    sampling: SamplingConfig,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Fit one fresh LoRA on `targets` (the student's modules: same placement) to all (source, teacher
    target, student prompt) rows; returns (weights, losses). No prompt dropout: the baseline is sampled
    without CFG, like the student."""
    sources = torch.cat([r.sources for r in rollouts.values()])
    results = torch.cat([r.targets for r in rollouts.values()])
    prompts = [plan.student(effect) for effect, r in rollouts.items() for _ in range(len(r.sources))]
    adapters = AdapterSet(backbone.transformer)
    parameters = adapters.add_trainable(_TRAINING, config.rank, config.alpha, targets, config.seed)
    try:
        adapters.activate(_TRAINING)
        batches = pair_batches(backbone, sources, results, prompts, config.batch_size, 0.0, sampling.negative_prompt)
        losses = fit(backbone, parameters, batches, config.steps, config.lr, config.seed, FM_ALL_IN_ONE)
        weights = adapters.lora_state_dict(_TRAINING)
    finally:
        adapters.remove(_TRAINING)
    return weights, losses


def write_baselines(params: Params, backbone: Backbone, bank: Bank, rollouts: dict[str, EffectRollouts], plan: PromptPlan, out: Path) -> dict:
    """Both baselines into `out` (replaced in one rename, nothing half written); returns the report."""
    config = params.baselines
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.perf_counter()
    weights, losses = train_fm_all_in_one(backbone, rollouts, plan, config.fm_all_in_one, params.distill.targets, params.sampling)
    export_student(weights, config.fm_all_in_one.alpha, staging / FM_ALL_IN_ONE, "float32", kohya=False)
    fm_seconds = time.perf_counter() - started
    merges = config.merges
    started = time.perf_counter()
    merged = write_merges(
        [e.teacher for e in bank.effects], staging / MERGES, merges.methods, merges.weights,
        rank=merges.rank, density=merges.density, majority_sign_method=merges.majority_sign_method, seed=merges.seed,
        base_shapes=base_linear_shapes(backbone.transformer), layout="diffusers",
    )
    report = {
        "effects": [e.id for e in bank.effects],
        "prompts_sha256": plan.digest(),
        FM_ALL_IN_ONE: {
            "file": f"{FM_ALL_IN_ONE}/{LORA_WEIGHTS}",
            "sha256": file_sha256(staging / FM_ALL_IN_ONE / LORA_WEIGHTS),
            "rows": sum(len(r.sources) for r in rollouts.values()),
            "steps": config.fm_all_in_one.steps,
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "seconds": fm_seconds,
        },
        MERGES: {
            method: {"file": path.relative_to(staging).as_posix(), "sha256": file_sha256(path)} for method, path in merged.items()
        },
        "merge_seconds": time.perf_counter() - started,
    }
    atomic_write_text(staging / REPORT, json.dumps(report, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return report

