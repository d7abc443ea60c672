"""Build the embedded demo effect bank (`data/`) deterministically from params.yaml.

Steps: fit the tiny pipeline's tokenizer on the instructions, pretrain the tiny base on general
edits, train an effect judge on procedural ground truth, then for each catalog effect make ~24
pairs, train its teacher LoRA and keep it only if the judge recognises the teacher's edits on
held-out sources; last, distil the base's acceleration LoRA on the general stream (the cascade
baseline's "Lightning"). Two manifests share one tree: `bank.yaml` (default size) and `bank-<n>.yaml`.

The build takes about an hour on 2 CPU cores for 50 effects, so it resumes: finished parts
(base, judge, each effect's verdict) are kept in the staging folder `<out>.build` and skipped on a
rerun, and a larger target only trains the new effects. The bank is published into `out` in one rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from collectionlora.adapters import NONE as NONE_ADAPTER
from collectionlora.adapters import AdapterSet
from collectionlora.base_pretrain import general_instructions, pretrain_base
from collectionlora.config import Params
from collectionlora.distill.acceleration import acceleration_config, train_acceleration
from collectionlora.effects import Effect, catalog, make_sources
from collectionlora.effects.base import stable_seed
from collectionlora.errors import BankError
from collectionlora.evaluate.fidelity import psnr
from collectionlora.evaluate.judge import (
    NONE,
    EffectJudge,
    holdout_report,
    procedural_examples,
    train_judge,
)
from collectionlora.images import load_png, quantize, save_png
from collectionlora.lorafile import ordinary_permissions
from collectionlora.models.backbone import Backbone
from collectionlora.models.tiny import build_tiny_pipeline
from collectionlora.sampling import sample_teacher
from collectionlora.teachers import LORA_WEIGHTS, save_teacher, train_teacher

BASE_POOL = 512  # general-split sources the base is pretrained on
HOLDOUT_REPORT = "holdout_report.json"  # the judge's accuracy on held-out ground truth
KEY_FILE = "build_key.txt"  # fingerprint of what a cached build step was computed from
ACCELERATION = "acceleration"  # folder of the base's acceleration LoRA


@dataclass
class EffectVerdict:
    id: str
    category: str
    stochastic: bool
    judge_rate: float          # share of the teacher's held-out edits the judge names correctly
    psnr_to_truth: float | None  # teacher output vs procedural ground truth (deterministic effects)
    passed: bool


def build_demo_bank(params: Params, out: Path, max_effects: int | None = None) -> list[EffectVerdict]:
    """Build (or resume building) the demo bank into `out`; returns every effect's verdict."""
    config = params.demo_bank
    target = max_effects or max(config.sizes.values())
    staging = out.with_name(out.name + ".build")
    staging.mkdir(parents=True, exist_ok=True)
    backbone = _base(params, staging / "base")
    judge, judge_key = _judge(params, staging / "judge")
    verdicts = _effects(params, backbone, judge, judge_key, staging, target)
    passed = [v for v in verdicts if v.passed]
    if len(passed) < target:
        raise BankError(
            f"only {len(passed)} of {len(verdicts)} catalog effects passed the judge ({target} needed); "
            "extend the catalog or raise lora.steps"
        )
    _write_sources(params, staging)
    _acceleration(params, staging)
    _write_manifests(params, staging, passed[:target])
    (staging / "build_report.json").write_text(
        json.dumps([asdict(v) for v in verdicts], indent=2) + "\n", encoding="utf-8"
    )
    _publish(staging, out, passed[:target])
    return verdicts


def _base(params: Params, folder: Path) -> Backbone:
    """The pretrained tiny base; rebuilt when its architecture or pretraining params change."""
    config = params.demo_bank
    key = fingerprint(
        params.base.tiny.model_dump(), general_instructions(), params.lora.prompt_dropout, params.sampling.negative_prompt,
        [config.seed, config.base_steps, config.base_lr, config.base_batch_size, BASE_POOL],
    )
    if not _cached(folder, key):
        # The base must not depend on the catalog's wording: fit on general instructions only
        # (plus the built-in editing vocabulary), so catalog changes never invalidate the base.
        pipe = build_tiny_pipeline(params.base.tiny, general_instructions(), config.seed)
        backbone = Backbone(pipe, params.base, embedded=True)
        pretrain_base(
            backbone, config.base_steps, config.base_lr, config.base_batch_size, BASE_POOL, config.seed,
            params.lora.prompt_dropout, params.sampling.negative_prompt,
        )
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        pipe.save_pretrained(partial)
        (partial / KEY_FILE).write_text(key + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    return Backbone.load(params.base, folder)


def fingerprint(*parts: object) -> str:
    """A content key for a cached build step: what it was computed from, hashed."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def effect_fingerprint(effect: Effect) -> str:
    """Changes whenever the effect's prompt or ground-truth function changes."""
    probe = make_sources("judge", 4, 32, 0)
    return fingerprint(effect.id, effect.prompt, effect.stochastic, effect.apply(probe, 0).numpy().tobytes())


def _cached(folder: Path, key: str) -> bool:
    marker = folder / KEY_FILE
    return marker.is_file() and marker.read_text(encoding="utf-8").strip() == key


def _judge(params: Params, folder: Path) -> tuple[EffectJudge, str]:
    """The catalog judge; retrained when any catalog effect or the judge params change."""
    config = params.judge
    key = fingerprint([effect_fingerprint(e) for e in catalog().values()], config.model_dump(), params.base.resolution)
    if not _cached(folder, key):
        examples = procedural_examples(list(catalog()), config.procedural_per_effect, params.base.resolution, config.seed)
        judge = train_judge(examples, config, [NONE, *catalog()])
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        judge.save(partial)
        report = holdout_report(judge, list(catalog()), config.holdout_per_effect, params.base.resolution, config.seed)
        (partial / HOLDOUT_REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (partial / KEY_FILE).write_text(key + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    return EffectJudge.load(folder), key


def _effects(
    params: Params, backbone: Backbone, judge: EffectJudge, judge_key: str, staging: Path, target: int
) -> list[EffectVerdict]:
    """Teachers in build order until `target` pass. A teacher is retrained only when its effect or the
    LoRA params change; its verdict is recomputed only when the teacher or the judge changes."""
    config = params.demo_bank
    adapters = AdapterSet(backbone.transformer)
    check_sources = make_sources("eval", config.eval_sources, params.base.resolution, config.seed)
    verdicts: list[EffectVerdict] = []
    progress = tqdm(build_order(), desc="demo-bank teachers", unit="effect")
    for effect in progress:
        if sum(v.passed for v in verdicts) >= target:
            break
        folder = staging / "effects" / effect.id
        teacher_key = fingerprint(effect_fingerprint(effect), params.lora.model_dump(), config.pairs_per_effect, config.seed)
        if not _cached(folder, teacher_key):
            _train(params, backbone, adapters, effect, folder, teacher_key)
        verdict_key = fingerprint(teacher_key, judge_key, config.model_dump(), params.sampling.model_dump())
        verdict_file = folder / "verdict.json"
        stored = json.loads(verdict_file.read_text(encoding="utf-8")) if verdict_file.is_file() else {}
        if stored.get("key") != verdict_key:
            verdict = _check(params, backbone, adapters, judge, effect, folder, check_sources)
            verdict_file.write_text(json.dumps({"key": verdict_key, **asdict(verdict)}) + "\n", encoding="utf-8")
        else:
            verdict = EffectVerdict(**{k: v for k, v in stored.items() if k != "key"})
        verdicts.append(verdict)
        progress.set_postfix(effect=effect.id, rate=f"{verdict.judge_rate:.2f}", refresh=False)
    return verdicts


def _train(params: Params, backbone: Backbone, adapters: AdapterSet, effect: Effect, folder: Path, key: str) -> None:
    """Make the effect's pairs and train its teacher into `folder` (teacher/, pairs/, key)."""
    config = params.demo_bank
    sources = make_sources("train", config.pairs_per_effect, params.base.resolution, stable_seed("pairs", config.seed, effect.id))
    results = quantize(effect.apply(sources, stable_seed("pair-effect", config.seed, effect.id)))
    weights, peft_config, _ = train_teacher(
        backbone, adapters, sources, results, effect.prompt, params.lora, params.sampling, effect.id
    )
    shutil.rmtree(folder, ignore_errors=True)
    save_teacher(weights, peft_config, folder / "teacher", params.lora.save_dtype)
    for i, (source, result) in enumerate(zip(sources, results)):
        save_png(source, folder / "pairs" / f"{i:04d}_source.png")
        save_png(result, folder / "pairs" / f"{i:04d}_result.png")
    (folder / KEY_FILE).write_text(key + "\n", encoding="utf-8")


def _check(params, backbone, adapters, judge, effect, folder, check_sources) -> EffectVerdict:
    """Run the saved teacher (in its storage dtype) on held-out sources and let the judge name the edits."""
    config = params.demo_bank
    adapters.add_teacher(effect.id, folder / "teacher" / LORA_WEIGHTS)
    adapters.activate(effect.id)
    seeds = [stable_seed("check", config.seed, effect.id, i) for i in range(len(check_sources))]
    edited = sample_teacher(
        backbone, check_sources, [effect.prompt] * len(check_sources), seeds, params.sampling,
        steps=config.teacher_check_steps, cfg_scale=config.teacher_check_cfg_scale,
    ).images
    adapters.activate(NONE_ADAPTER)
    adapters.drop_teacher(effect.id)
    rate = sum(p == effect.id for p in judge.predict(check_sources, edited)) / len(check_sources)
    truth = None if effect.stochastic else effect.apply(check_sources, 0)
    return EffectVerdict(
        effect.id, effect.category, effect.stochastic, rate,
        None if truth is None else round(float(psnr(edited, truth).mean()), 2),
        rate >= config.teacher_pass_rate,
    )


def _write_sources(params: Params, staging: Path) -> None:
    config, size = params.demo_bank, params.base.resolution
    for name, split, count in (("general/sources", "general", config.general_sources), ("eval", "eval", config.eval_sources)):
        shutil.rmtree(staging / name, ignore_errors=True)
        for i, image in enumerate(make_sources(split, count, size, config.seed)):
            save_png(image, staging / name / f"{i:04d}.png")
    (staging / "general" / "instructions.txt").write_text("\n".join(general_instructions()) + "\n", encoding="utf-8")


def _acceleration(params: Params, staging: Path) -> None:
    """The base's few-step LoRA (the cascade baseline's "Lightning"), distilled on the general stream;
    retrained when the base, the general data or the settings it trains with change."""
    folder = staging / ACCELERATION
    base_key = (staging / "base" / KEY_FILE).read_text(encoding="utf-8")
    key = fingerprint(
        base_key, acceleration_config(params).model_dump(), params.sampling.model_dump(),
        params.demo_bank.general_sources, general_instructions(),
    )
    if _cached(folder, key):
        return
    backbone = Backbone.load(params.base, staging / "base")
    general = torch.stack([load_png(path, params.base.resolution) for path in sorted((staging / "general" / "sources").glob("*.png"))])
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    train_acceleration(params, backbone, general, general_instructions(), partial)
    (partial / KEY_FILE).write_text(key + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def _publish(staging: Path, out: Path, passed: list[EffectVerdict]) -> None:
    """Copy the bank's files (not the build's bookkeeping) into a fresh `out`, replaced in one rename.

    The staging folder stays, so a later build with a larger target only trains the new effects.
    """
    fresh = out.with_name(out.name + ".publish")
    shutil.rmtree(fresh, ignore_errors=True)
    for name in ("base", "judge", "general", "eval", ACCELERATION):
        shutil.copytree(staging / name, fresh / name, ignore=shutil.ignore_patterns(KEY_FILE))
    for manifest in [*staging.glob("bank*.yaml"), staging / "build_report.json"]:
        shutil.copy2(manifest, fresh / manifest.name)
    for verdict in passed:
        for part in ("teacher", "pairs"):
            shutil.copytree(staging / "effects" / verdict.id / part, fresh / "effects" / verdict.id / part)
    ordinary_permissions(fresh)  # save_pretrained's safetensors files are 0600
    if out.exists():
        shutil.rmtree(out)
    os.replace(fresh, out)


def build_order() -> list[Effect]:
    """Catalog effects in the order the bank takes them, so that any prefix is varied: categories
    interleaved, and one stochastic effect after every two deterministic ones (the few-step half of
    the method is only tested by stochastic effects). The default bank is the first passing
    effects; the larger bank extends it."""
    effects = list(catalog().values())
    deterministic = _interleave([e for e in effects if not e.stochastic])
    stochastic = _interleave([e for e in effects if e.stochastic])
    order = []
    while deterministic or stochastic:
        order += deterministic[:2] + stochastic[:1]
        deterministic, stochastic = deterministic[2:], stochastic[1:]
    return order


def _interleave(effects: list[Effect]) -> list[Effect]:
    by_category: dict[str, list[Effect]] = {}
    for effect in effects:
        by_category.setdefault(effect.category, []).append(effect)
    order = []
    while any(by_category.values()):
        for queue in by_category.values():
            if queue:
                order.append(queue.pop(0))
    return order


def _write_manifests(params: Params, staging: Path, passed: list[EffectVerdict]) -> None:
    """bank.yaml for the default size, bank-<n>.yaml for each other size reached; all share one tree."""
    effects = catalog()
    for name, count in params.demo_bank.sizes.items():
        if count > len(passed):
            continue
        manifest = {
            "version": 1,
            "name": f"demo-{name}",
            "base": {"path": "base"},
            "judge": "judge",
            "acceleration": f"{ACCELERATION}/{LORA_WEIGHTS}",
            "general": {"sources": "general/sources", "instructions": "general/instructions.txt"},
            "eval": "eval",
            "effects": [
                {
                    "id": v.id,
                    "category": v.category,
                    "prompt": effects[v.id].prompt,
                    "teacher": f"effects/{v.id}/teacher/{LORA_WEIGHTS}",
                    "pairs": f"effects/{v.id}/pairs",
                }
                for v in passed[:count]
            ],
        }
        filename = "bank.yaml" if name == "default" else f"bank-{count}.yaml"
        (staging / filename).write_text(yaml.safe_dump(manifest, sort_keys=False, width=120), encoding="utf-8")
