"""The alternatives a user would otherwise ship, built from the same bank and rollouts as the student:

- "FM all-in-1": one LoRA fitted by plain flow matching to every teacher target, each with its effect's
  student prompt (what the paper trains as "50-in-1 (FM)"): the same data, none of the distillation;
- "PEFT merges": the teacher LoRAs merged into one (merging.py: linear, ties, dare_ties, svd, cat).

Both are sampled by the evaluation with the bank's acceleration LoRA stacked on them at 8 NFE. They are
a stage of their own: they depend on the rollouts and on the student folder's prompts.json (and, with
`fm_all_in_one.source: anchor`, its anchor/ LoRA), not on the student's final weights.

`source: anchor` (params.yaml's default): the distillation's anchor phase is exactly this fit (TA-FM alone
on every teacher target with the student prompts), so its LoRA is the baseline and nothing is trained
twice; the table then reads "the student before and after its distillation iterations".
`source: train`: fitted here (a run without an anchor phase, e.g. the paper's settings).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from collectionlora.adapters import AdapterSet
from collectionlora.bank import Bank, file_sha256
from collectionlora.config import FmAllInOneConfig, Params, SamplingConfig
from collectionlora.distill.export import ANCHOR, ANCHOR_RECORD, LORA_WEIGHTS, export_student
from collectionlora.distill.prompting import PromptPlan
from collectionlora.errors import CollectionLoraError, ConfigError
from collectionlora.flowmatch import fit, pair_batches
from collectionlora.lorafile import atomic_write_text, base_linear_shapes, replace_folder
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


def anchor_lora(student: Path) -> tuple[Path, dict]:
    """The anchored student's LoRA file in `student` (a distill output) and its anchor.json."""
    record_path = Path(student) / ANCHOR / ANCHOR_RECORD
    path = Path(student) / ANCHOR / LORA_WEIGHTS
    if not record_path.is_file():
        raise CollectionLoraError(f"{record_path}: missing; re-run `collectionlora distill` (it writes the anchor when its anchor phase ends)")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if record["anchor_steps"] == 0:
        raise ConfigError(f"{record_path}: that run had no anchor phase (distill.anchor_steps 0); set baselines.fm_all_in_one.source: train")
    if not path.is_file():
        raise CollectionLoraError(f"{path}: missing; re-run `collectionlora distill`")
    return path, record


def _fm_all_in_one(params: Params, backbone: Backbone, rollouts: dict[str, EffectRollouts], plan: PromptPlan, student: Path, staging: Path) -> dict:
    """Write the FM all-in-1 LoRA into `staging`; returns its report entry."""
    config, started = params.baselines.fm_all_in_one, time.perf_counter()
    rows = sum(len(r.sources) for r in rollouts.values())
    if config.source == "anchor":
        anchor, record = anchor_lora(student)
        (staging / FM_ALL_IN_ONE).mkdir(parents=True)
        shutil.copyfile(anchor, staging / FM_ALL_IN_ONE / LORA_WEIGHTS)
        entry = {"source": "anchor", "steps": record["anchor_steps"], "rows_seen": record["rows"]}
    else:
        weights, losses = train_fm_all_in_one(backbone, rollouts, plan, config, params.distill.targets, params.sampling)
        export_student(weights, config.alpha, staging / FM_ALL_IN_ONE, "float32", kohya=False)
        entry = {"source": "train", "steps": config.steps, "rows_seen": config.steps * config.batch_size, "final_loss": sum(losses[-50:]) / len(losses[-50:])}
    return {
        "file": f"{FM_ALL_IN_ONE}/{LORA_WEIGHTS}",
        "sha256": file_sha256(staging / FM_ALL_IN_ONE / LORA_WEIGHTS),
        "rows": rows,
        **entry,
        "seconds": time.perf_counter() - started,
    }


def write_baselines(
    params: Params, backbone: Backbone, bank: Bank, rollouts: dict[str, EffectRollouts], plan: PromptPlan, student: Path, out: Path
) -> dict:
    """Both baselines into `out` (replaced in one rename, nothing half written); returns the report."""
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        report = _write_staging(params, backbone, bank, rollouts, plan, student, staging)
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk gets its space back; `out` is as it was
        raise
    return report


def _write_staging(
    params: Params, backbone: Backbone, bank: Bank, rollouts: dict[str, EffectRollouts], plan: PromptPlan, student: Path, staging: Path
) -> dict:
    config = params.baselines
    fm = _fm_all_in_one(params, backbone, rollouts, plan, student, staging)
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
        FM_ALL_IN_ONE: fm,
        MERGES: {
            method: {"file": path.relative_to(staging).as_posix(), "sha256": file_sha256(path)} for method, path in merged.items()
        },
        "merge_seconds": time.perf_counter() - started,
    }
    atomic_write_text(staging / REPORT, json.dumps(report, indent=2) + "\n")  # last: the folder is complete
    return report

