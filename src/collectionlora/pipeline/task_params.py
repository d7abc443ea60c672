"""The pipeline's one `params` parameter as a task's validated Params, with the bank's paths moved to
where Kubeflow put the imported data folder.

The parameter is params.yaml's sections as JSON text, not a KFP dict: a KFP dict (a protobuf Struct)
cannot hold null, which params.yaml uses, and turns every integer into a float."""

from __future__ import annotations

from pathlib import Path

import hashlib
import json

from pydantic import ValidationError

from collectionlora.bank import open_bank
from collectionlora.config import Params, merge
from collectionlora.errors import ConfigError


# The sections a rollout task reads (dvc.yaml's rollout stage lists the same; a test checks). The
# rollout tasks get only these, so that Kubeflow's cache keeps their results when other sections change.
ROLLOUT_SECTIONS = ("base", "sampling", "rollout", "bank")
ORIGIN = "the pipeline parameter 'params'"


def params_json(params: Params | dict) -> str:
    """The pipeline parameter's value: canonical JSON, so that equal params compile to equal bytes."""
    raw = params.model_dump(mode="json") if isinstance(params, Params) else params
    return json.dumps(raw, sort_keys=True, separators=(",", ":"))


def task_params(text: str, bank_dir: str | Path, sections: tuple[str, ...] | None = None) -> Params:
    """Validate `text` (params.yaml's sections as JSON, or exactly `sections` of them) with the CLI's
    models, with bank.root, bank.manifest and base.path (when inside the bank root) moved to `bank_dir`.
    A partial Params lacks the other sections: reading one is an AttributeError, never a default."""
    raw = _json_mapping(text)
    raw = merge(raw, _moved_paths(raw, Path(bank_dir)))
    if sections is None:
        return validate_params(raw, ORIGIN)
    if set(raw) != set(sections):
        raise ConfigError(f"{ORIGIN}: expected the sections {', '.join(sections)}, got {', '.join(sorted(raw))}")
    validated = {}
    for name in sections:
        try:
            validated[name] = Params.model_fields[name].annotation.model_validate(raw[name])
        except ValidationError as error:
            raise ConfigError(f"{ORIGIN}: {name}.{_first_error(error)}") from error
    return Params.model_construct(**validated)


def validate_params(raw: dict, origin: str) -> Params:
    """`raw` as Params, or one line naming `origin` and the first bad field."""
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{origin}: {_first_error(error)}") from error


def sections_json(text: str, names: tuple[str, ...]) -> str:
    """The named sections of the pipeline parameter, as a parameter of their own (a task's cache key)."""
    raw = _json_mapping(text)
    return params_json({name: raw[name] for name in names if name in raw})


def bank_digest(manifest: dict) -> str:
    """One sha256 of every file a validated bank references (manifest.json's `files`): what a task's
    cache key needs, since Kubeflow keys an imported bank by its URI, not by its content."""
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def shipped_effects(params: Params) -> list[str]:
    """The effect ids the collection will hold (bank.effects / bank.max_effects applied): the fan-out."""
    return [effect.id for effect in open_bank(params.bank).effects]


def _json_mapping(text: str) -> dict:
    try:
        raw = json.loads(text)
    except (TypeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{ORIGIN}: not JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{ORIGIN}: expected a JSON object of params.yaml's sections")
    return raw


def _moved_paths(raw: dict, bank_dir: Path) -> dict:
    bank, base = raw.get("bank") or {}, raw.get("base") or {}
    if not all(isinstance(bank.get(key), str) for key in ("root", "manifest")):
        raise ConfigError(f"{ORIGIN}: bank.root and bank.manifest must be paths")
    root = Path(bank["root"])
    moved = {"bank": {"root": str(bank_dir), "manifest": str(bank_dir / _inside(bank["manifest"], root, "bank.manifest"))}}
    if base.get("model") == "embedded" and Path(base.get("path") or "").is_relative_to(root):
        # (a bank that names its own base, as the demo bank does, needs no base.path at all)
        moved["base"] = {"path": str(bank_dir / Path(base["path"]).relative_to(root))}
    return moved


def _inside(path: str, root: Path, field: str) -> Path:
    try:
        return Path(path).relative_to(root)
    except ValueError:
        raise ConfigError(f"{ORIGIN}: {field}: {path} is outside bank.root {root}; the pipeline imports the bank root only") from None


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    return f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
