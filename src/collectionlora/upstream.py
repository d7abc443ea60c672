"""What a stage reads from the stages before it, checked before it loads a model or writes a file: a
missing artifact says which stage to run, a stale one which stage to re-run (the rollouts check their
own freshness in rollout.load_rollouts)."""

from __future__ import annotations

import json
from pathlib import Path

from collectionlora.bank import Bank
from collectionlora.config import Params
from collectionlora.distill.export import COLLECTION, LORA_WEIGHTS, PROMPTS, check_collection_files, read_collection
from collectionlora.distill.prompting import PromptPlan, read_prompt_plan
from collectionlora.errors import CollectionLoraError

BASELINE_METHODS = ("fm_all_in_one", "merges")  # evaluate.methods that read the baselines folder


def rerun(stage: str, folder: Path | None, when: str = "first") -> str:
    """The remedy: which stage to run, into which folder, by hand or through DVC."""
    return f"run `collectionlora {stage}` {when} (--out {folder}, or `dvc repro {stage}`)"


def student_prompts(student: Path, bank: Bank) -> PromptPlan:
    """The student prompts a distill run wrote (`student`/prompts.json), covering the bank's effects."""
    path = Path(student) / PROMPTS
    if not path.is_file():
        raise CollectionLoraError(f"{path}: missing: no distill run in {student}; {rerun('distill', student)}")
    plan = read_prompt_plan(path, [])
    lacking = [e.id for e in bank.effects if e.id not in {p.effect for p in plan.effects}]
    if lacking:
        raise CollectionLoraError(f"{path}: effects: stale: no student prompt for the bank's {lacking}; {rerun('distill', student, 'again')}")
    return plan


def trained_collection(collection: Path, bank: Bank) -> dict:
    """collection.json of a finished distill run that covers the bank's effects, beside the LoRA it describes."""
    record = read_collection(collection)
    known = {e["effect"] for e in record["prompts"]["effects"]}
    lacking = [e.id for e in bank.effects if e.id not in known]
    if lacking:
        raise CollectionLoraError(
            f"{Path(collection) / COLLECTION}: prompts.effects: stale: the collection lacks the bank's {lacking}; "
            f"{rerun('distill', collection, 'again')}"
        )
    check_collection_files(collection, record, Path(collection) / LORA_WEIGHTS)
    return record


def evaluated_baselines(params: Params, baselines: Path | None, bank: Bank, plan: PromptPlan) -> None:
    """When evaluate scores the baselines, their folder must hold a `baselines` run for this bank and, for
    FM all-in-1, for these student prompts (it learnt them; other prompts would score it unfairly)."""
    wanted = [m for m in params.evaluate.methods if m in BASELINE_METHODS]
    if not wanted:
        return
    if baselines is None:
        raise CollectionLoraError(f"evaluate.methods: {wanted} need a baselines folder; pass --baselines or drop them")
    path = Path(baselines) / "baselines.json"
    if not path.is_file():
        raise CollectionLoraError(f"{path}: missing: no baselines in {baselines}; {rerun('baselines', baselines)}")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        effects, prompts = report["effects"], report["prompts_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CollectionLoraError(f"{path}: unreadable ({' '.join(str(error).split())}); {rerun('baselines', baselines, 'again')}") from error
    if effects != [e.id for e in bank.effects]:
        why = f"made for {effects}, the bank has {[e.id for e in bank.effects]}"
        raise CollectionLoraError(f"{path}: effects: stale: {why}; {rerun('baselines', baselines, 'again')}")
    if "fm_all_in_one" in wanted and prompts != plan.digest():
        why = "FM all-in-1 learnt other student prompts than the collection's"
        raise CollectionLoraError(f"{path}: prompts_sha256: stale: {why}; {rerun('baselines', baselines, 'again')}")
