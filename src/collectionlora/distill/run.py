"""The distill stage end to end: bank + rollouts + prompts -> trained student -> exported collection.

Fresh runs, exact resumes (`resume=True`, from the newest full-state checkpoint) and incremental
runs (`warm_start=<collection>`: the bank's effects not yet in that collection are added by a
short run starting from its student and critic) all go through `distill_collection`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from collectionlora.adapters import AdapterSet
from collectionlora.bank import Bank, file_sha256, open_bank, tree_hashes
from collectionlora.config import DistillConfig, Params
from collectionlora.distill import export
from collectionlora.distill.export import PROMPTS
from collectionlora.distill.checkpoint import (
    CheckpointError,
    check_fingerprint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from collectionlora.distill.data import DistillData, EffectSchedule
from collectionlora.distill.parallel import (
    World,
    barrier,
    broadcast_parameters,
    close_world,
    init_world,
    parameters_in_sync,
)
from collectionlora.distill.prompting import (
    PromptPlan,
    extend_plan,
    plan_prompts,
    read_prompt_plan,
)
from collectionlora.distill.trainer import CRITIC, STUDENT, Distiller
from collectionlora.errors import CollectionLoraError
from collectionlora.evaluate.fidelity import effect_fidelity
from collectionlora.evaluate.judge import EffectJudge
from collectionlora.lorafile import atomic_write_text, remove_temp_files
from collectionlora.models.backbone import Backbone
from collectionlora.rollout import load_rollouts
from collectionlora.sampling import sample_student, student_timesteps
from collectionlora.tracking import RunLogger, check_reachable, tracking_uri

CHECKPOINTS = "checkpoints"
METRICS = "metrics.json"
HISTORY = "metrics.jsonl"
LOSSES = "losses.json"  # the loss columns of HISTORY as one JSON list: `dvc plots` reads no JSONL
INCREMENTAL_REPORT = "incremental_report.json"
INPUTS = "inputs.json"  # in CHECKPOINTS: what a fresh run started from (see auto_resume)
# Values that may change between a run and its resume without changing what is trained.
RUNTIME_FIELDS = {"max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "save_dtype", "kohya_export"}


def distill_collection(
    params: Params,
    rollouts: Path,
    out: Path,
    resume: bool = False,
    warm_start: Path | None = None,
) -> dict:
    """Train (or resume, or extend) the collection; rank 0 writes `out` and returns the run summary."""
    world, device = init_world(params.base.device)
    try:
        return _distill(params, Path(rollouts), Path(out), resume, warm_start, world, device)
    finally:
        close_world(world)


def check_start(out: Path, resume: bool) -> list[Path]:
    """`out`'s checkpoints; an error when some exist and this is not a resume (the launcher checks it
    too, before starting workers that would each report it)."""
    checkpoints = list_checkpoints(Path(out) / CHECKPOINTS)
    if checkpoints and not resume:
        raise CheckpointError(f"{Path(out) / CHECKPOINTS}: checkpoints of an earlier run exist; pass --resume to continue it, or remove {out}")
    return checkpoints


def auto_resume(params: Params, rollouts: Path, out: Path, warm_start: Path | None = None) -> bool:
    """Whether to resume the run in `out`, for a persistent `dvc repro` output (one process).

    True only when `out` holds an unfinished run (checkpoints, no metrics.json) that started from the
    same inputs (`inputs.json`: every params section distill reads, the package's code, the bank's
    files, the rollout indexes, the warm start). Otherwise `out` is removed, as DVC removes a
    non-persistent output before running its stage, and False: a params change is a clean retrain.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CollectionLoraError("distill --auto-resume runs on one process; under torchrun pass --resume or nothing")
    out = Path(out)
    recorded = out / CHECKPOINTS / INPUTS
    resumable = (
        bool(list_checkpoints(out / CHECKPOINTS))
        and not (out / METRICS).exists()
        and recorded.is_file()
        and json.loads(recorded.read_text(encoding="utf-8")) == _inputs(params, Path(rollouts), warm_start)
    )
    if not resumable and out.exists():
        shutil.rmtree(out)
    return resumable


def _inputs(params: Params, rollouts: Path, warm_start: Path | None) -> dict:
    """Digests of everything a distill run reads: a run may only be continued with the same ones."""
    sections = ("base", "sampling", "prompting", "distill", "bank", "incremental")
    raw = {name: params.model_dump(mode="json")[name] for name in sections}
    package = {k: v for k, v in tree_hashes(Path(__file__).resolve().parents[1]).items() if k.endswith(".py")}
    indexes = {p.relative_to(rollouts).as_posix(): file_sha256(p) for p in sorted(rollouts.rglob("index.jsonl"))}
    return {
        "params": _digest(json.dumps(raw, sort_keys=True).encode()),
        "code": _digest(json.dumps(package, sort_keys=True).encode()),
        "bank": _digest(json.dumps(tree_hashes(Path(params.bank.root)), sort_keys=True).encode()),
        "rollouts": _digest(json.dumps(indexes, sort_keys=True).encode()),
        "warm_start": str(warm_start) if warm_start else None,
    }


def _distill(params: Params, rollouts: Path, out: Path, resume: bool, warm_start: Path | None, world: World, device: str) -> dict:
    started = time.perf_counter()
    inputs = _inputs(params, rollouts, warm_start)  # before the warm start's override, as auto_resume sees them
    if warm_start is not None:  # the old student is anchored already; the new effects get the full objective
        params = params.model_copy(update={"distill": params.distill.model_copy(update={"anchor_steps": 0})})
    config = params.distill
    if world.is_main:
        check_reachable(tracking_uri(params.tracking))  # now, not after minutes of loading: the run logs there
        remove_temp_files(out)  # of a run killed mid-write (this one holds OUT's lock)
    bank = open_bank(params.bank)
    checkpoints = check_start(out, resume)
    # Every input is read before anything is written or loaded: missing or stale rollouts, a damaged
    # checkpoint or a warm start that is no collection is one line, and OUT stays as it was.
    effect_ids = [e.id for e in bank.effects]
    targets = load_rollouts(rollouts, bank, effect_ids)
    checkpoint = load_checkpoint(checkpoints[-1]) if checkpoints else None
    old_record = export.read_collection(warm_start) if warm_start else None
    old_effects = [e["effect"] for e in old_record["prompts"]["effects"]] if old_record else []
    new_effects = [e for e in effect_ids if e not in old_effects]
    if warm_start is not None and not new_effects:
        raise CollectionLoraError(f"{params.bank.manifest}: effects: nothing to add, every effect is already in {warm_start}")
    missing = [e for e in old_effects if e not in effect_ids]
    if missing:
        raise CollectionLoraError(f"{params.bank.manifest}: effects: the bank lacks {missing} of the collection {warm_start}")
    if not checkpoints and world.is_main:
        (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / CHECKPOINTS / INPUTS, json.dumps(inputs, indent=2) + "\n")

    threads = params.base.threads if device.startswith("cuda") else max(1, params.base.threads // world.size)  # launch.py
    backbone = Backbone.load(params.base.model_copy(update={"device": device, "threads": threads}), bank.base_dir)
    adapters = AdapterSet(backbone.transformer)
    plan = _prompt_plan(backbone, bank, params, out, old_record, new_effects, world, reuse=bool(checkpoints))
    for effect in bank.effects:
        adapters.add_teacher(effect.id, effect.teacher)
    adapters.add_trainable(STUDENT, config.rank, config.alpha, config.targets, config.seed)
    adapters.add_trainable(CRITIC, config.rank, config.alpha, config.targets, config.seed + 1)

    data = DistillData(
        backbone,
        {e: (targets[e].sources, targets[e].targets, targets[e].teacher_prompt, plan.student(e)) for e in effect_ids},
        bank.load_general_sources(),
        bank.instructions,
        params.sampling.negative_prompt,
    )
    replay = params.incremental.replay if warm_start else 0.0
    schedule = EffectSchedule(new_effects if warm_start else effect_ids, old_effects, replay, config.seed)
    timesteps = student_timesteps(params.sampling)
    max_steps = (
        params.incremental.generator_steps_per_effect * len(new_effects) * config.generator_every
        if warm_start
        else config.anchor_steps + config.max_steps
    )
    distiller = Distiller(backbone, adapters, config, params.sampling, timesteps, data, schedule, world, max_steps)
    fingerprint = _fingerprint(params, plan, rollouts, effect_ids, world, warm_start, max_steps)

    before = None
    if checkpoint is not None:
        check_fingerprint(checkpoint, fingerprint)
        distiller.load_tensors(checkpoint.tensors)
        distiller.state = checkpoint.state
        _carry_counters(distiller)
        started -= checkpoint.state.seconds  # the run's seconds include those of its earlier segments
    elif warm_start is not None:
        previous = list_checkpoints(Path(warm_start) / CHECKPOINTS)
        if not previous:
            raise CheckpointError(f"{Path(warm_start) / CHECKPOINTS}: no checkpoint to warm-start from (the student and critic are read from it)")
        distiller.load_tensors(load_checkpoint(previous[-1]).tensors, with_optimizers=False)
        if world.is_main:
            before = _old_effect_fidelity(backbone, adapters, bank, plan, old_effects, timesteps, params)
    broadcast_parameters(distiller.trainable, world)

    logger = RunLogger(
        params.tracking, f"distill-{bank.name}", params.model_dump(mode="json"), out / HISTORY, world.is_main, distiller.state.tracking_run_id
    )
    distiller.state.tracking_run_id = logger.run_id
    _truncate_history(out / HISTORY, distiller.state.step, world)
    status = "FAILED"
    try:
        summary = _train(distiller, max_steps, config, out, fingerprint, logger, world, started)
        status = "FINISHED"
    finally:
        logger.close(status)
    if not world.is_main:
        return summary
    record = _export(adapters, plan, bank, params, out, timesteps, summary, rollouts, warm_start, logger.run_id)
    summary["seconds"] = time.perf_counter() - started  # of the whole run, earlier segments included
    if warm_start is not None:
        after = _old_effect_fidelity(backbone, adapters, bank, plan, old_effects, timesteps, params)
        report = {"added": new_effects, "old_effects": old_effects, "generator_steps": summary["generator_updates"], "before": before, "after": after}
        atomic_write_text(out / INCREMENTAL_REPORT, json.dumps(report, indent=2) + "\n")
        summary["incremental"] = report
    atomic_write_text(out / LOSSES, _loss_curves(out / HISTORY))
    atomic_write_text(out / METRICS, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    summary["collection"] = record
    return summary


def _loss_curves(history: Path) -> str:
    """`step` and the `loss_*` values of every metrics.jsonl record, as a JSON list."""
    lines = history.read_text(encoding="utf-8").splitlines() if history.exists() else []
    records = [json.loads(line) for line in lines if line]
    return json.dumps([{k: v for k, v in r.items() if k == "step" or k.startswith("loss_")} for r in records]) + "\n"


def _prompt_plan(
    backbone: Backbone, bank: Bank, params: Params, out: Path, old_record: dict | None, new_effects: list[str], world: World, reuse: bool
) -> PromptPlan:
    """AOP prompts, made once by rank 0 (a VLM captioner is called once) and read by the others.
    A resumed run reuses prompts.json; an incremental run keeps the old effects' triggers."""
    path = out / PROMPTS
    if world.is_main and not (reuse and path.exists()):
        teacher_prompts = [(e.id, e.prompt) for e in bank.effects]

        def pairs(effect_id: str):
            return bank.load_pairs(bank.effect(effect_id))

        if old_record is not None:
            old = PromptPlan.from_json(old_record["prompts"])
            plan = extend_plan(backbone, old, [p for p in teacher_prompts if p[0] in new_effects], params.prompting, pairs)
        else:
            plan = plan_prompts(backbone, teacher_prompts, params.prompting, pairs)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(plan.to_json(), indent=2) + "\n")
    barrier(world)
    return read_prompt_plan(path, [e.id for e in bank.effects])


def _fingerprint(
    params: Params, plan: PromptPlan, rollouts: Path, effect_ids: list[str], world: World, warm_start: Path | None, max_steps: int
) -> dict:
    """What a checkpoint's training depends on, flattened, so a mismatch names the field. A decaying
    learning rate ties the run to its length: then max_steps is part of it."""
    distill = {k: v for k, v in params.distill.model_dump(mode="json").items() if k not in RUNTIME_FIELDS}
    flat = {f"distill.{k}": json.dumps(v) for k, v in distill.items()}
    if params.distill.lr_schedule != "constant":
        flat["distill.max_steps"] = json.dumps(max_steps)
    flat.update({f"sampling.{k}": json.dumps(v) for k, v in params.sampling.model_dump(mode="json").items()})
    flat["prompts"] = plan.digest()
    for effect_id in effect_ids:
        flat[f"rollouts.{effect_id}"] = _digest((rollouts / effect_id / "index.jsonl").read_bytes())
    flat["world_size"] = str(world.size)
    flat["warm_start"] = str(warm_start)
    return flat


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _train(
    distiller: Distiller, max_steps: int, config: DistillConfig, out: Path, fingerprint: dict, logger: RunLogger, world: World, started: float
) -> dict:
    """Step until max_steps: log every log_every, checkpoint every checkpoint_every and at the end.
    `started`: the perf_counter time the run (with its segments before a resume) started at."""
    window: dict[str, list[float]] = defaultdict(list)
    state = distiller.state
    in_sync = True
    last_window: dict[str, float] = {}
    # One bar per phase: an anchor step costs a fraction of an iteration, so one bar's estimate would be wrong.
    anchor = min(config.anchor_steps, max_steps)
    for phase, start, end in (("distill anchor", 0, anchor), ("distill", anchor, max_steps)):
        if state.step >= end:
            continue
        with tqdm(total=end - start, initial=state.step - start, desc=phase, unit="step", disable=not world.is_main, mininterval=2.0) as bar:
            while state.step < end:
                log = distiller.step()
                for name, value in log.losses.items():
                    window[name].append(value)
                bar.update(1)
                if state.step == anchor and world.is_main:
                    export.export_anchor(distiller.adapters.lora_state_dict(STUDENT), config.alpha, out, state.step, state.step * config.batch_size)
                done = state.step == max_steps
                if state.step % config.log_every == 0 or done:
                    metrics = {f"loss_{k}": sum(v) / len(v) for k, v in window.items() if v}
                    metrics.update(_counters(distiller))
                    with distiller.timings.measure("logging"):
                        logger.log(metrics, state.step)
                    bar.set_postfix({k.removeprefix("loss_"): f"{v:.4f}" for k, v in metrics.items() if k.startswith("loss_")}, refresh=False)
                    last_window = metrics
                    window.clear()
                if state.step % config.checkpoint_every == 0 or done:
                    in_sync = parameters_in_sync(distiller.trainable, world) and in_sync
                    if not in_sync:
                        raise CollectionLoraError(f"distill: ranks hold different LoRA weights at step {state.step}")
                    if world.is_main:
                        with distiller.timings.measure("checkpoint"):
                            _save(distiller, out, fingerprint, config.keep_checkpoints, time.perf_counter() - started)
    return {"steps": state.step, **_counters(distiller), "last_window": last_window, "world_size": world.size, "ranks_in_sync": in_sync}


def _counters(distiller: Distiller) -> dict:
    state = distiller.state
    return {
        "anchor_updates": state.anchor_updates,
        "generator_updates": state.generator_updates,
        "critic_updates": state.critic_updates,
        "effect_steps": state.stream_counts["effect"],
        "general_steps": state.stream_counts["general"],
        "nonfinite_skipped": state.nonfinite_skipped,
        "teacher_loads": distiller.adapters.loads,
        "adapter_switches": distiller.adapters.switches,
        **distiller.timings.as_dict(),
    }


def _save(distiller: Distiller, out: Path, fingerprint: dict, keep: int, seconds: float) -> None:
    """A checkpoint of finite weights only: a diverging run keeps its last good checkpoint. It holds
    the run's counters and times so far (`seconds` since the run started), which a resume continues."""
    if not distiller.parameters_finite():
        tqdm.write(f"distill: non-finite weights at step {distiller.state.step}; checkpoint not written")
        return
    state = distiller.state
    state.timings = asdict(distiller.timings)
    state.adapter_counts = {"loads": distiller.adapters.loads, "switches": distiller.adapters.switches}
    state.seconds = seconds
    save_checkpoint(out / CHECKPOINTS, state, fingerprint, distiller.tensors(), keep)


def _carry_counters(distiller: Distiller) -> None:
    """metrics.json covers the whole run: add the times and adapter counts of the segments before the
    checkpoint to this one's (the steps redone after a kill count once; teacher reloads do count)."""
    state, timings = distiller.state, distiller.timings
    for name, value in state.timings.items():
        if hasattr(timings, name):
            setattr(timings, name, getattr(timings, name) + value)
    distiller.adapters.loads += state.adapter_counts.get("loads", 0)
    distiller.adapters.switches += state.adapter_counts.get("switches", 0)


def _truncate_history(path: Path, step: int, world: World) -> None:
    """A resumed run re-logs the steps after its checkpoint: drop them from metrics.jsonl first (and a
    line a full disk cut short)."""
    if not world.is_main or not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["step"] <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _export(
    adapters: AdapterSet,
    plan: PromptPlan,
    bank: Bank,
    params: Params,
    out: Path,
    timesteps: list[float],
    summary: dict,
    rollouts: Path,
    warm_start: Path | None,
    tracking_run_id: str | None,
) -> dict:
    files = export.export_student(
        adapters.lora_state_dict(STUDENT), params.distill.alpha, out, params.distill.save_dtype, params.distill.kohya_export
    )
    files.update(export.write_scheduler(out))
    if params.distill.anchor_steps == 0:  # no anchor phase in this run (a warm start has none either)
        export.export_anchor(None, params.distill.alpha, out, 0, 0)
    base = bank.spec.base
    # relative to the collection folder (edit.recorded_base): usable from any working directory, and no
    # path of this machine in a file the registry ships
    base_path = Path(os.path.relpath(bank.base_dir.resolve(), out.resolve())).as_posix() if bank.base_dir else None
    record = {
        "format": "collectionlora/1",
        "name": bank.name,
        "base": {"path": base_path, "model": base.model, "pipeline": params.base.pipeline},
        "timesteps": timesteps,
        "sampler": "x0-prediction with re-noising over the step list, no CFG",
        "diffusers": export.diffusers_recipe(timesteps, params.base.resolution, params.base.is_embedded),
        "composition_template": "Please apply {first} to the input image, and then apply {then}.",
        "prompts": plan.to_json(),
        "effects": [{"id": e.id, "category": e.category, "teacher_sha256": file_sha256(e.teacher)} for e in bank.effects],
        "files": files,
        "rollout_index_sha256": {e.id: _digest((rollouts / e.id / "index.jsonl").read_bytes()) for e in bank.effects},
        "warm_start": str(warm_start) if warm_start else None,
        "training": {k: summary[k] for k in ("steps", "anchor_updates", "generator_updates", "critic_updates", "effect_steps", "general_steps")},
        "tracking_run_id": tracking_run_id,  # the MLflow run of the distillation: the registry links to it
    }
    export.write_collection(out, record)
    export.write_model_card(out, record)
    return record


def _old_effect_fidelity(
    backbone: Backbone, adapters: AdapterSet, bank: Bank, plan: PromptPlan, effect_ids: list[str], timesteps: list[float], params: Params
) -> dict:
    """Judge rate (and PSNR to ground truth) of the student on eval sources for `effect_ids`."""
    if bank.judge is None:
        return {}
    judge = EffectJudge.load(bank.judge)
    sources = bank.load_eval_sources()
    adapters.activate(STUDENT)

    def edit(effect_id: str, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        return sample_student(backbone, images, [plan.student(effect_id)] * len(images), seeds, timesteps).images

    return effect_fidelity(edit, effect_ids, sources, judge, params.distill.seed)[0]
