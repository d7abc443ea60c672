"""Per-effect fidelity of a trained collection next to its teachers: the teachers at their many-step
CFG sampler (80 NFE by default) and the one student LoRA at each requested step count.

A quick, honest check after `distill` (judge verdict rate, PSNR to ground truth for deterministic
catalog effects, PSNR to the teacher's edit); the full evaluation stage builds on the same pieces.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from collectionlora.adapters import AdapterSet
from collectionlora.bank import open_bank
from collectionlora.config import Params
from collectionlora.distill.export import LORA_WEIGHTS, read_collection
from collectionlora.distill.prompting import PromptPlan
from collectionlora.errors import CollectionLoraError
from collectionlora.evaluate.fidelity import effect_fidelity
from collectionlora.evaluate.judge import EffectJudge
from collectionlora.lorafile import atomic_write_text
from collectionlora.models.backbone import Backbone
from collectionlora.sampling import sample_student, sample_teacher, student_timesteps

STUDENT = "collection"
REPORT = "fidelity.json"
TABLE = "fidelity.md"


def collection_fidelity(params: Params, collection: Path, student_steps: Sequence[int], out: Path | None = None) -> dict:
    """Teachers vs the student on the bank's eval sources; writes fidelity.json and fidelity.md to `out`."""
    bank = open_bank(params.bank)
    if bank.judge is None:
        raise CollectionLoraError(f"{params.bank.manifest}: judge: the bank has no effect judge (train one with `collectionlora judge train`)")
    plan = PromptPlan.from_json(read_collection(collection)["prompts"])
    effect_ids = [e.id for e in bank.effects]
    backbone = Backbone.load(params.base, bank.base_dir)
    adapters = AdapterSet(backbone.transformer)
    for effect in bank.effects:
        adapters.add_teacher(effect.id, effect.teacher)
    adapters.add_teacher(STUDENT, Path(collection) / LORA_WEIGHTS)
    judge = EffectJudge.load(bank.judge)
    sources = bank.load_eval_sources()
    seed = params.distill.seed

    def teacher(effect_id: str, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        adapters.activate(effect_id)
        return sample_teacher(backbone, images, [bank.effect(effect_id).prompt] * len(images), seeds, params.sampling).images

    nfe = params.sampling.teacher_steps * (2 if params.sampling.teacher_cfg_scale != 1.0 else 1)
    teacher_report, teacher_edits = effect_fidelity(teacher, effect_ids, sources, judge, seed)
    methods = {f"teacher_{nfe}nfe": teacher_report}
    adapters.activate(STUDENT)
    for steps in student_steps:
        timesteps = student_timesteps(params.sampling, steps)

        def student(effect_id: str, images: torch.Tensor, seeds: list[int], timesteps=timesteps) -> torch.Tensor:
            return sample_student(backbone, images, [plan.student(effect_id)] * len(images), seeds, timesteps).images

        methods[f"student_{steps}nfe"] = effect_fidelity(student, effect_ids, sources, judge, seed, teacher_edits)[0]
    report = {"effects": effect_ids, "eval_sources": len(sources), "methods": methods, "summary": _summary(methods)}
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out) / REPORT, json.dumps(report, indent=2) + "\n")
        atomic_write_text(Path(out) / TABLE, markdown_table(report))
    return report


def _summary(methods: dict[str, dict[str, dict]]) -> dict[str, dict]:
    summary = {}
    for name, rows in methods.items():
        columns = {key for row in rows.values() for key in row}
        summary[name] = {key: sum(r[key] for r in rows.values() if key in r) / sum(key in r for r in rows.values()) for key in sorted(columns)}
    return summary


def markdown_table(report: dict) -> str:
    """One row per effect: judge rate / PSNR to truth per method, then the means."""
    methods = list(report["methods"])
    head = "| effect | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods) + "\n"

    def cell(row: dict) -> str:
        text = f"{row['judge_rate']:.2f}"
        if "psnr_truth_db" in row:
            text += f" / {row['psnr_truth_db']:.1f} dB"
        return text

    lines = [f"| {e} | " + " | ".join(cell(report["methods"][m][e]) for m in methods) + " |" for e in report["effects"]]
    lines.append("| **mean** | " + " | ".join(cell(report["summary"][m]) for m in methods) + " |")
    note = "\nCells: judge verdict rate on the eval sources / PSNR to the procedural ground truth (deterministic effects).\n"
    return head + "\n".join(lines) + "\n" + note
