"""The validate stage: check the whole bank, then record what was checked as manifest.json.

manifest.json exists only after a fully successful run: a stale one is deleted first, and the new
one is written atomically at the end, so later stages can trust its presence.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import yaml

from collectionlora.bank import Bank, decode_utf8, file_sha256, open_bank, tree_hashes
from collectionlora.config import BankConfig
from collectionlora.errors import BankError
from collectionlora.images import load_png
from collectionlora.loradelta import base_norms_squared, check_delta
from collectionlora.lorafile import (
    ADAPTER_CONFIG,
    LoraWeights,
    atomic_write_text,
    base_linear_shapes_from_safetensors,
    read_lora,
)
from collectionlora.safefiles import check_model_tree

MANIFEST = "manifest.json"


def run_validate(bank_config: BankConfig, out_dir: Path, dvc_file: Path | None, data_version: str | None = None) -> dict:
    """Validate everything the bank manifest references; write and return out_dir/manifest.json.
    The data version is `dvc_file`'s md5, or `data_version` where no .dvc file travels with the bank
    (a Kubeflow run imports the data folder; the pipeline was compiled beside data.dvc)."""
    out_dir = Path(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    manifest_path = Path(bank_config.manifest)
    if Path(bank_config.root).resolve() != manifest_path.parent.resolve():
        raise BankError(
            f"{manifest_path}: the bank root is the manifest's folder, but bank.root is {bank_config.root}"
        )
    checks = [
        "manifest schema, unique ids, non-empty prompts", "paths inside the bank root", "no pickle files",
        "ids not reserved, ids and prompts bounded, prompts visible", "base: a local folder or a well-formed hub id",
    ]
    bank = open_bank(bank_config)  # what the stages will use: bank.effects / bank.max_effects applied
    for folder in [bank.judge, bank.base_dir]:
        if folder is not None:  # a base outside the bank (an absolute base.model) may hold symlinks (a hub cache)
            check_model_tree(folder, bank.root if folder.resolve().is_relative_to(bank.root.resolve()) else None)
    checks.append("base and judge: regular files only, symlinks inside the bank, safetensors files whole")

    for effect in bank.effects:
        if len(effect.pairs) < bank_config.min_pairs:
            raise BankError(
                f"{effect.pairs_dir}: {len(effect.pairs)} pairs, fewer than bank.min_pairs={bank_config.min_pairs}"
            )
    checks.append(f"every effect has >= {bank_config.min_pairs} pairs")

    images = [path for effect in bank.effects for pair in effect.pairs for path in pair]
    images += [*bank.general_sources, *bank.eval_sources]
    for path in images:
        load_png(path, bank_config.image_size)
    checks.append(f"{len(images)} images are PNG, RGB, {bank_config.image_size}x{bank_config.image_size}")
    checks.append(
        f"general: {len(bank.general_sources)} sources, {len(bank.instructions)} instructions; "
        f"eval: {len(bank.eval_sources)} sources"
    )

    base_shapes = None
    if bank.base_dir is not None:
        base_shapes = base_linear_shapes_from_safetensors(bank.base_dir / "transformer")
    teachers = {effect.id: read_lora(effect.teacher, base_shapes) for effect in bank.effects}
    acceleration = None if bank.acceleration is None else read_lora(bank.acceleration, base_shapes)
    checks.append(
        "teacher LoRAs" + (" and the acceleration LoRA" if acceleration is not None else "")
        + ": safetensors, floating point, finite, keys normalised"
        + (", shapes fit the base" if base_shapes is not None else " (no local base: shapes not checked)")
    )
    # teachers must edit: delta >= bank.min_teacher_delta; a few-step acceleration LoRA may be small, not zero
    loras = {effect.teacher: (teachers[effect.id], bank_config.min_teacher_delta) for effect in bank.effects}
    if acceleration is not None:
        loras[bank.acceleration] = (acceleration, 0.0)
    base_norms = None
    if bank.base_dir is not None:
        adapted = {module for weights, _ in loras.values() for module in weights.modules}
        base_norms = base_norms_squared(bank.base_dir / "transformer", adapted)
    deltas = {path: check_delta(path, weights, base_norms, minimum) for path, (weights, minimum) in loras.items()}
    checks.append(
        f"teacher deltas >= bank.min_teacher_delta={bank_config.min_teacher_delta:g} of the base weights"
        if base_norms is not None else "teacher deltas non-zero (no local base: relative size not checked)"
    )

    manifest = {
        "bank": {
            "name": bank.name,
            "manifest": manifest_path.name,
            "manifest_sha256": file_sha256(manifest_path),
            "image_size": bank_config.image_size,
        },
        "base": _base_reference(bank),
        "data_dvc_md5": dvc_md5(dvc_file) if dvc_file is not None else data_version,
        "effects": [
            {
                "id": effect.id,
                "category": effect.category,
                "prompt": effect.prompt,
                "pairs": len(effect.pairs),
                "teacher": _teacher_summary(bank, effect.teacher, teachers[effect.id], deltas[effect.teacher]),
            }
            for effect in bank.effects
        ],
        "acceleration": None if acceleration is None else _teacher_summary(bank, bank.acceleration, acceleration, deltas[bank.acceleration]),
        "general": {"sources": len(bank.general_sources), "instructions": len(bank.instructions)},
        "eval": {"sources": len(bank.eval_sources)},
        "files": _referenced_hashes(bank),
        "checks": checks,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def _teacher_summary(bank: Bank, path: Path, weights: LoraWeights, delta: float) -> dict:
    """Ranks, alphas, targeted module kinds (block indices folded to '*'), not the full module list, and the
    delta (relative to the base weights with a local base, else absolute; loradelta.py)."""
    kinds = sorted({re.sub(r"(^|\.)\d+(?=\.)", r"\1*", name) for name in weights.modules})
    return {
        "path": bank.relative(path),
        "layout": weights.layout,
        "modules": len(weights.modules),
        "ranks": sorted(set(weights.ranks().values())),
        "alphas": sorted(set(weights.alphas().values())),
        "targets": kinds,
        "delta": float(f"{delta:.4g}") if math.isfinite(delta) else None,
    }


def _base_reference(bank: Bank) -> dict:
    spec = bank.spec.base
    reference: dict = {"path": spec.path, "model": spec.model}
    if bank.base_dir is not None:
        transformer = bank.base_dir / "transformer"
        weights = sorted(p for p in transformer.iterdir() if p.is_file() and p.name.endswith((".safetensors", ".json")))
        combined = hashlib.sha256()
        for path in weights:
            combined.update(f"{path.name} {file_sha256(path)}\n".encode())
        model_index = bank.base_dir / "model_index.json"
        if not model_index.is_file():
            raise BankError(f"{model_index}: missing (the base must be a diffusers pipeline folder)")
        reference["model_index_sha256"] = file_sha256(model_index)
        reference["transformer_sha256"] = combined.hexdigest()
    return reference


def _referenced_hashes(bank: Bank) -> dict[str, str]:
    """sha256 of every file the manifest references under the root, keyed by path relative to it."""
    paths = [bank.manifest, bank.instructions_file, *bank.general_sources, *bank.eval_sources]
    for effect in bank.effects:
        paths.append(effect.teacher)
        if (effect.teacher.parent / ADAPTER_CONFIG).is_file():
            paths.append(effect.teacher.parent / ADAPTER_CONFIG)
        paths += [path for pair in effect.pairs for path in pair]
    if bank.acceleration is not None:
        paths.append(bank.acceleration)
    hashes = {bank.relative(path): file_sha256(path) for path in paths}
    folders = [bank.judge] if bank.judge is not None else []
    if bank.spec.base.path is not None and bank.base_dir is not None:
        folders.append(bank.base_dir)
    for folder in folders:
        prefix = bank.relative(folder)
        hashes.update({f"{prefix}/{name}": digest for name, digest in tree_hashes(folder, bank.root).items()})
    return dict(sorted(hashes.items()))


def dvc_md5(dvc_file: Path | None) -> str | None:
    """outs[0].md5 of the data .dvc file, linking this manifest to the DVC-tracked data version."""
    if dvc_file is None or not Path(dvc_file).is_file():
        return None
    try:
        raw = yaml.safe_load(decode_utf8(Path(dvc_file), Path(dvc_file).read_bytes()))
        md5 = raw["outs"][0]["md5"]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError) as error:
        raise BankError(f"{dvc_file}: outs[0].md5: cannot read ({' '.join(str(error).split())})") from error
    if not isinstance(md5, str):
        raise BankError(f"{dvc_file}: outs[0].md5: expected a string")
    return md5
