"""Teacher targets y for every (effect, training source): base + that effect's LoRA, teacher prompt,
many Euler steps with CFG (the paper's "Base" targets, docs/method.md 7.2).

The cache is content-addressed: a target's file name is the sha256 of everything it depends on (the
base, the teacher file, the source image, the prompt, the sampler settings and the seed), so adding
an effect computes that effect only, changing a teacher recomputes its targets only, and a killed run
resumes where it stopped. Targets are sampled in fixed batches of the effect's target list (a batch
with any target missing is sampled whole, only its missing targets written), so a resumed run writes
the same bytes as an uninterrupted one. Layout under `out`:
    <effect>/<key>.png      one target, written atomically (temp file, fsync, then rename)
    <effect>/index.jsonl    one line per (source, sample), written when the effect is complete
    index.jsonl             the lines of every bank effect rolled out so far, in bank order
    report.json             computed / cached / seconds per effect of the last run, written last; a
                            run that will change OUT removes it first, so it marks a completed run
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from collectionlora.adapters import NONE, AdapterSet
from collectionlora.bank import Bank, Effect, file_sha256, tree_hashes
from collectionlora.config import BaseConfig, RolloutConfig, SamplingConfig
from collectionlora.effects.base import stable_seed
from collectionlora.errors import RolloutError
from collectionlora.images import load_png, save_png
from collectionlora.lorafile import (
    ADAPTER_CONFIG,
    atomic_write,
    atomic_write_text,
    remove_temp_files,
    replace_folder,
)
from collectionlora.models.backbone import Backbone
from collectionlora.sampling import sample_teacher

INDEX = "index.jsonl"
REPORT = "report.json"
FIELDS = (
    "effect", "source", "source_sha256", "sample", "seed", "teacher_prompt", "target", "key",
    "teacher_sha256", "base_sha256", "steps", "cfg_scale",
)


@dataclass
class EffectRollouts:
    """One effect's training data for distillation: sources and teacher targets, row for row."""

    effect: str
    teacher_prompt: str
    sources: torch.Tensor  # [N, 3, S, S] in [0, 1]
    targets: torch.Tensor  # [N, 3, S, S] in [0, 1]
    seeds: list[int]


@dataclass(frozen=True)
class BaseHash:
    """The base's content hash: of every file of its local folder, or of the model id when there is none."""

    sha256: str
    of: str  # "files" or "model id"


def base_hash(bank: Bank) -> BaseHash:
    """Hash the base the way both the writer and the reader of rollouts do (a real base: minutes of I/O)."""
    if bank.base_dir is None:
        return BaseHash(_sha256_text(bank.spec.base.model), "model id")
    listing = "".join(f"{name} {digest}\n" for name, digest in tree_hashes(bank.base_dir).items())
    return BaseHash(_sha256_text(listing), "files")


def teacher_sha256(effect: Effect) -> str:
    """The teacher LoRA file's sha256, combined with its adapter_config.json's when there is one."""
    config = effect.teacher.parent / ADAPTER_CONFIG
    if not config.is_file():
        return file_sha256(effect.teacher)
    listing = f"{effect.teacher.name} {file_sha256(effect.teacher)}\n{ADAPTER_CONFIG} {file_sha256(config)}\n"
    return _sha256_text(listing)


def select_effects(bank: Bank, effect_ids: list[str] | None) -> list[Effect]:
    """The named effects (default: all) in bank order; an unknown id is a BankError naming the manifest."""
    if effect_ids is None:
        return list(bank.effects)
    wanted = {bank.effect(effect_id).id for effect_id in effect_ids}
    return [effect for effect in bank.effects if effect.id in wanted]


def generate_rollouts(
    backbone: Backbone,
    bank: Bank,
    effects: list[Effect],
    base: BaseConfig,
    sampling: SamplingConfig,
    rollout: RolloutConfig,
    out: Path,
) -> dict:
    """Sample every missing target of `effects`, then rebuild the combined index and report.json.
    Returns the report."""
    out = Path(out)
    started = time.perf_counter()
    remove_temp_files(out)  # of a run killed mid-write (this one holds OUT's lock, runlock.py)
    fingerprint = base_hash(bank)
    adapters = AdapterSet(backbone.transformer)
    plans = [_plan_effect(bank, effect, fingerprint, base, sampling, rollout, out) for effect in effects]
    if any(plan.misses or _index_text(plan.records) != _read_text(out / plan.effect.id / INDEX) for plan in plans):
        (out / REPORT).unlink(missing_ok=True)  # the completion marker: back when this run, which changes OUT, completes
    # one bar over the targets still to sample (cached ones take no time and would skew its estimate)
    missing = sum(len(plan.misses) for plan in plans)
    with tqdm(total=missing, desc="rollout", unit="target", mininterval=2.0, disable=missing == 0) as bar:  # all cached: no bar
        per_effect = {plan.effect.id: _roll_effect(backbone, adapters, bank, plan, sampling, rollout, out, bar) for plan in plans}
    _write_combined_index(bank, out)
    report = {
        "bank": bank.name,
        "base_sha256": fingerprint.sha256,
        "base_hash_of": fingerprint.of,
        "effects": per_effect,
        "totals": {
            "computed": sum(r["computed"] for r in per_effect.values()),
            "cached": sum(r["cached"] for r in per_effect.values()),
            "seconds": round(time.perf_counter() - started, 3),
        },
    }
    atomic_write_text(out / REPORT, json.dumps(report, indent=2) + "\n")
    return report


def load_rollouts(out: Path, bank: Bank, effect_ids: list[str]) -> dict[str, EffectRollouts]:
    """Read the chosen effects' rollouts, refusing any that are missing or no longer match the bank
    (teacher, base, source or prompt changed), so a trainer never learns from stale targets."""
    out = Path(out)
    if not out.is_dir():  # never rolled out here (a wrong --rollouts, or the stage not run yet)
        raise RolloutError(f"{out}: missing: no rollouts there; run `collectionlora rollout` first (--out {out}, or `dvc repro rollout`)")
    fingerprint = base_hash(bank)
    return {effect_id: _load_effect(out, bank, bank.effect(effect_id), fingerprint) for effect_id in effect_ids}


# ---- writing -------------------------------------------------------------------------------------
@dataclass
class _EffectPlan:
    """An effect's targets: index records, key -> (source row, seed), the keys not yet on disk."""

    effect: Effect
    records: list[dict]
    rows: dict[str, tuple[int, int]]
    misses: list[str]
    seconds: float


def _plan_effect(
    bank: Bank, effect: Effect, fingerprint: BaseHash, base: BaseConfig, sampling: SamplingConfig, rollout: RolloutConfig, out: Path
) -> _EffectPlan:
    started = time.perf_counter()
    folder = out / effect.id
    teacher = teacher_sha256(effect)
    settings = {
        "teacher_steps": sampling.teacher_steps,
        "teacher_cfg_scale": sampling.teacher_cfg_scale,
        "shift": sampling.shift,
        "negative_prompt": sampling.negative_prompt,
        "teacher_cfg_norm": sampling.teacher_cfg_norm,
        "resolution": base.resolution,
        "dtype": base.dtype,
    }
    records, rows = [], {}  # rows: key -> (source row, seed), one entry per distinct target
    for row, (source_path, _) in enumerate(effect.pairs):
        source_sha = file_sha256(source_path)
        for sample in range(rollout.samples_per_source):
            seed = stable_seed("rollout", rollout.seed, effect.id, source_sha, sample)
            key = _sha256_text(_canonical({
                "base_sha256": fingerprint.sha256,
                "teacher_sha256": teacher,
                "source_sha256": source_sha,
                "teacher_prompt": effect.prompt,
                "sampler": settings,
                "seed": seed,
            }))
            rows[key] = (row, seed)
            records.append({
                "effect": effect.id,
                "source": bank.relative(source_path),
                "source_sha256": source_sha,
                "sample": sample,
                "seed": seed,
                "teacher_prompt": effect.prompt,
                "target": f"{effect.id}/{key}.png",
                "key": key,
                "teacher_sha256": teacher,
                "base_sha256": fingerprint.sha256,
                "base_hash_of": fingerprint.of,
                "steps": sampling.teacher_steps,
                "cfg_scale": sampling.teacher_cfg_scale,
            })

    misses = [key for key in rows if not (folder / f"{key}.png").is_file()]
    return _EffectPlan(effect, records, rows, misses, time.perf_counter() - started)


def _roll_effect(
    backbone: Backbone, adapters: AdapterSet, bank: Bank, plan: _EffectPlan, sampling: SamplingConfig, rollout: RolloutConfig, out: Path, bar: tqdm
) -> dict:
    started = time.perf_counter() - plan.seconds
    effect, records, rows, misses = plan.effect, plan.records, plan.rows, plan.misses
    folder = out / effect.id
    if misses:
        sources = bank.load_pairs(effect)[0]
        adapters.add_teacher(effect.id, effect.teacher)
        adapters.activate(effect.id)
        keys, missing = list(rows), set(misses)
        for start in range(0, len(keys), rollout.batch_size):
            batch = keys[start : start + rollout.batch_size]  # fixed batches: a target's pixels never depend on the cache
            if missing.isdisjoint(batch):
                continue
            picked = sources[torch.tensor([rows[key][0] for key in batch])]
            seeds = [rows[key][1] for key in batch]
            images = sample_teacher(backbone, picked, [effect.prompt] * len(batch), seeds, sampling).images
            written = [(key, image) for key, image in zip(batch, images) if key in missing]
            for key, image in written:
                atomic_write(folder / f"{key}.png", partial(save_png, image))
            bar.update(len(written))
        adapters.activate(NONE)
        adapters.drop_teacher(effect.id)

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / INDEX, _index_text(records))
    _remove_stale(folder, set(rows))
    seconds = round(time.perf_counter() - started, 3)
    return {"computed": len(misses), "cached": len(rows) - len(misses), "seconds": seconds}


def _remove_stale(folder: Path, keys: set[str]) -> None:
    """Targets no longer indexed (old teacher, removed pair, other settings); temp files of killed runs
    went at the start (remove_temp_files)."""
    for path in folder.iterdir():
        if path.is_file() and path.suffix == ".png" and not path.name.startswith(".") and path.stem not in keys:
            path.unlink()


def merge_rollouts(bank: Bank, parts: list[Path], out: Path) -> None:
    """Rollout folders of separate tasks (one effect each, a Kubeflow fan-out) as one folder, with the
    combined index in bank order; each bank effect must come from exactly one part."""
    out = Path(out)
    found: dict[str, Path] = {}
    for part in map(Path, parts):
        for effect in bank.effects:
            if (part / effect.id / INDEX).is_file():
                if effect.id in found:
                    raise RolloutError(f"{part / effect.id}: effect '{effect.id}' was also rolled out in {found[effect.id]}")
                found[effect.id] = part
    missing = [effect.id for effect in bank.effects if effect.id not in found]
    if missing:
        raise RolloutError(f"{out}: no rollouts for {', '.join(missing)} among the {len(parts)} parts")
    for effect_id, part in found.items():  # each effect's folder whole or not at all, the index last
        staging = out / f".{effect_id}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(part / effect_id, staging)
        replace_folder(staging, out / effect_id)
    _write_combined_index(bank, out)


def _write_combined_index(bank: Bank, out: Path) -> None:
    parts = [(out / e.id / INDEX).read_text(encoding="utf-8") for e in bank.effects if (out / e.id / INDEX).is_file()]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / INDEX, "".join(parts))


# ---- reading -------------------------------------------------------------------------------------
def _load_effect(out: Path, bank: Bank, effect: Effect, fingerprint: BaseHash) -> EffectRollouts:
    index = out / effect.id / INDEX
    rerun = f"run `collectionlora rollout --effects {effect.id}` (--out {out}, or `dvc repro rollout`)"
    if not index.is_file():
        raise RolloutError(f"{index}: missing: no rollouts for effect '{effect.id}'; {rerun}")
    current = {
        "teacher_sha256": (teacher_sha256(effect), "teacher changed since the rollout"),
        "base_sha256": (fingerprint.sha256, "base model changed since the rollout"),
        "teacher_prompt": (effect.prompt, "teacher prompt changed since the rollout"),
    }
    source_sha = {bank.relative(source): file_sha256(source) for source, _ in effect.pairs}
    records = _read_index(index)
    if not records:
        raise RolloutError(f"{index}: empty; {rerun}")
    for line, record in enumerate(records, start=1):
        for field, (value, why) in current.items():
            if record[field] != value:
                raise RolloutError(f"{index}: line {line}: {field}: stale: {why}; {rerun}")
        if source_sha.get(record["source"]) != record["source_sha256"]:
            why = f"source {record['source']} changed or left the pairs"
            raise RolloutError(f"{index}: line {line}: source_sha256: stale: {why}; {rerun}")
        if not (out / record["target"]).is_file():
            raise RolloutError(f"{index}: line {line}: target: missing file {out / record['target']}; {rerun}")
    unrolled = sorted(set(source_sha) - {record["source"] for record in records})
    if unrolled:
        why = f"{len(unrolled)} pair sources have no target (e.g. {unrolled[0]})"
        raise RolloutError(f"{index}: source: stale: {why}; {rerun}")
    size = bank.image_size
    return EffectRollouts(
        effect=effect.id,
        teacher_prompt=effect.prompt,
        sources=torch.stack([load_png(bank.root / record["source"], size) for record in records]),
        targets=torch.stack([load_png(out / record["target"], size) for record in records]),
        seeds=[record["seed"] for record in records],
    )


def _read_index(index: Path) -> list[dict]:
    records = []
    for line, text in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise RolloutError(f"{index}: line {line}: not valid JSON ({error.msg})") from error
        missing = [field for field in FIELDS if not isinstance(record, dict) or field not in record]
        if missing:
            raise RolloutError(f"{index}: line {line}: {missing[0]}: missing field")
        records.append(record)
    return records


def _index_text(records: list[dict]) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def _read_text(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
