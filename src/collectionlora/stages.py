"""The pipeline stages, one function each, called by the CLI, DVC, the KFP components and the tests.

Each takes typed config sections and explicit paths; none reads params.yaml itself.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

from collectionlora.adapters import NONE, AdapterSet
from collectionlora.bank import Bank, open_bank, read_pair_folder
from collectionlora.config import Params
from collectionlora.effects import catalog
from collectionlora.effects.base import stable_seed
from collectionlora.errors import BankError
from collectionlora.evaluate.judge import NONE as NONE_LABEL
from collectionlora.evaluate.judge import (
    examples_from_pairs,
    holdout_report,
    procedural_examples,
    train_judge,
)
from collectionlora.images import grid, save_png
from collectionlora.lorafile import atomic_write_text
from collectionlora.models.backbone import Backbone
from collectionlora.rollout import generate_rollouts, select_effects
from collectionlora.runlock import claim
from collectionlora.sampling import sample_teacher
from collectionlora.teachers import save_teacher, train_teacher
from collectionlora.validate import run_validate
from collectionlora.writable import check_output_file, check_output_folder

__all__ = [
    "run_acceleration_train", "run_baselines", "run_distill", "run_evaluate", "run_judge_train", "run_preview", "run_register", "run_rollout",
    "run_teacher_train", "run_validate",
]


def run_preview(params: Params, out: Path) -> Path:
    """Each teacher on held-out eval sources: one grid row per effect of (source | teacher | ground truth).

    Ground truth exists for catalog effects only; a user's own effect shows source | teacher.
    """
    bank = open_bank(params.bank)
    check_output_file(out)
    with claim(out, "preview"):
        return _preview(params, bank, Path(out))


def _preview(params: Params, bank: Bank, out: Path) -> Path:
    backbone = Backbone.load(params.base, bank.base_dir)
    adapters = AdapterSet(backbone.transformer)
    sources = bank.load_eval_sources()[: params.demo.eval_images]
    known = catalog()
    rows = []
    for effect in bank.effects:
        adapters.add_teacher(effect.id, effect.teacher)
        adapters.activate(effect.id)
        seeds = [stable_seed("preview", effect.id, i) for i in range(len(sources))]
        edited = sample_teacher(backbone, sources, [effect.prompt] * len(sources), seeds, params.sampling).images
        truth = known[effect.id].apply(sources, 0) if effect.id in known else None
        row = []
        for i, source in enumerate(sources):
            row += [source, edited[i]] + ([truth[i]] if truth is not None else [])
        rows.append(row)
    adapters.activate(NONE)
    save_png(grid(rows, scale=params.demo.grid_scale), out)
    return out


def run_rollout(params: Params, out: Path, effects: list[str] | None = None) -> dict:
    """Teacher targets for the bank's effects (or the named subset, one KFP task each), reusing every
    target already in `out`; returns the report (computed / cached per effect). See rollout.py."""
    bank = open_bank(params.bank)
    chosen = select_effects(bank, effects)  # an unknown id fails before anything is loaded or written
    check_output_folder(out)
    with claim(out, "rollout"):
        backbone = Backbone.load(params.base, bank.base_dir)
        return generate_rollouts(backbone, bank, chosen, params.base, params.sampling, params.rollout, Path(out))


def run_teacher_train(params: Params, pairs: Path, prompt: str, out: Path, base: Path | None = None) -> Path:
    """Train one effect LoRA from a folder of pairs; writes out/pytorch_lora_weights.safetensors."""
    if not prompt.strip():
        raise BankError(f"{pairs}: the teacher prompt is empty")
    sources, results = read_pair_folder(Path(pairs), params.bank.image_size)
    check_output_folder(out)
    with claim(out, "teachers train"):
        backbone = Backbone.load(params.base, base)
        adapters = AdapterSet(backbone.transformer)
        weights, peft_config, _ = train_teacher(
            backbone, adapters, sources, results, prompt, params.lora, params.sampling, Path(out).name
        )
        return save_teacher(weights, peft_config, Path(out), params.lora.save_dtype)


def run_judge_train(params: Params, out: Path) -> dict:
    """Train an effect judge for the bank: its own pairs (+ unedited pairs), plus procedural ground
    truth for effects that come from the catalog. A user's own effects need nothing but their pairs.
    Writes the judge to `out` and returns its hold-out report (catalog effects only have one)."""
    bank = open_bank(params.bank)
    check_output_folder(out)
    with claim(out, "judge train"):
        return _judge_train(params, bank, Path(out))


def _judge_train(params: Params, bank: Bank, out: Path) -> dict:
    pairs = {effect.id: bank.load_pairs(effect) for effect in bank.effects}
    examples = examples_from_pairs(pairs)
    known = [effect_id for effect_id in pairs if effect_id in catalog()]
    if known:
        size, config = params.bank.image_size, params.judge
        examples = examples + procedural_examples(known, config.procedural_per_effect, size, config.seed)
    judge = train_judge(examples, params.judge, [NONE_LABEL, *pairs])
    judge.save(out)
    report = {"effects": list(pairs), "catalog_effects": known}
    if known:
        report["holdout"] = holdout_report(judge, known, params.judge.holdout_per_effect, params.bank.image_size, params.judge.seed)
    atomic_write_text(out / "train_report.json", json.dumps(report, indent=2) + "\n")
    return report


def run_acceleration_train(params: Params, out: Path) -> Path:
    """The bank's base and general stream -> its acceleration LoRA in `out`; see distill/acceleration.py."""
    from collectionlora.distill.acceleration import train_acceleration
    bank = open_bank(params.bank)
    check_output_folder(out)
    with claim(out, "acceleration train"):
        backbone = Backbone.load(params.base, bank.base_dir)
        return train_acceleration(params, backbone, bank.load_general_sources(), bank.instructions, out)


def run_distill(params: Params, rollouts: Path, out: Path, resume: bool = False, warm_start: Path | None = None) -> dict:
    """Distil the bank's teachers (from their rollouts) into one student LoRA; see distill/run.py.
    With `distill.processes` > 1 the run goes to that many torchrun workers (distill/launch.py).
    Rank 0 holds `out` (runlock.py): the only rank that writes it."""
    from collectionlora.distill import launch
    from collectionlora.distill.run import distill_collection
    check_output_folder(out)  # the rollouts, a checkpoint and a warm start are read before OUT is written (distill/run.py)
    writes = os.environ.get("RANK", "0") == "0"
    with claim(out, "distill") if writes else nullcontext():
        if launch.needs_launch(params):
            return launch.launch(params, rollouts, out, resume, warm_start)
        return distill_collection(params, rollouts, out, resume, warm_start)


def run_baselines(params: Params, rollouts: Path, student: Path, out: Path) -> dict:
    """The alternatives to the student (FM all-in-1 with the student prompts of `student`/prompts.json, a
    distill output, taken from its anchor/ or trained on the rollouts; PEFT merges of the teachers) into
    `out`; see evaluate/baselines.py."""
    from collectionlora.evaluate.baselines import anchor_lora, write_baselines
    from collectionlora.rollout import load_rollouts
    from collectionlora.upstream import student_prompts

    bank = open_bank(params.bank)
    plan = student_prompts(Path(student), bank)  # the inputs first: a missing or stale one names the stage to run
    targets = load_rollouts(Path(rollouts), bank, [e.id for e in bank.effects])
    if params.baselines.fm_all_in_one.source == "anchor":
        anchor_lora(Path(student))
    check_output_folder(out)
    with claim(out, "baselines"):
        backbone = Backbone.load(params.base, bank.base_dir)
        return write_baselines(params, backbone, bank, targets, plan, Path(student), Path(out))


def run_evaluate(params: Params, collection: Path, baselines: Path | None, out: Path, params_file: Path = Path("params.yaml")) -> dict:
    """Every method of `evaluate.methods` scored on the bank's eval sources, the report and the gate in
    `out`; returns metrics.json's content. See evaluate/run.py."""
    from collectionlora.distill.prompting import PromptPlan
    from collectionlora.evaluate.run import evaluate_collection
    from collectionlora.upstream import evaluated_baselines, trained_collection

    bank = open_bank(params.bank)  # the inputs first: a missing or stale one names the stage to run
    record = trained_collection(Path(collection), bank)
    evaluated_baselines(params, baselines, bank, PromptPlan.from_json(record["prompts"]))
    check_output_folder(out)
    with claim(out, "evaluate"):
        return evaluate_collection(params, Path(collection), record, baselines, Path(out), params_file)


def run_register(
    params: Params, collection: Path, evaluation: Path, manifest: Path, out: Path | None, require_pass: bool = False, repo: Path = Path(".")
) -> dict:
    """The evaluated collection as a new MLflow model version (alias `challenger`; `champion` by the
    gate-and-beat rule); returns registration.json's content. See registry/register.py."""
    from collectionlora.registry.register import register_collection

    with claim(out, "register") if out is not None else nullcontext():
        return register_collection(params, Path(collection), Path(evaluation), Path(manifest), out, require_pass, Path(repo)).to_json()
