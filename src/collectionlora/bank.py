"""The effect bank: bank.yaml schema, loading with strict path rules, and content hashing.

Paths in bank.yaml are relative to the bank root, the folder holding bank.yaml (several manifests
may share one root). Loading checks structure (schema, paths, pair folders, no pickle files);
image contents and LoRA files are checked by `validate`, and read here only when asked for.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from collectionlora.config import BankConfig
from collectionlora.errors import BankError
from collectionlora.images import load_png
from collectionlora.lorafile import ADAPTER_CONFIG, PICKLE_SUFFIXES
from collectionlora.safefiles import check_name_lengths, inside, regular_file, walk_regular_files
from collectionlora.yamlfile import load_yaml

_PAIR_FILE = re.compile(r"^(?P<index>\d{4,})_(?P<role>source|result)\.png$")
# Names the code gives its own adapters, judge labels and streams: an effect with one of them would be
# mistaken for them (adapters.NONE and judge.NONE "none", the confusion matrix's pooled "other", routing's
# "effect"/"general" streams, distill's "student"/"critic", evaluate's method and baseline adapters, edit's
# "collection", teacher training's adapter, AdapterSet's "teacher_slot_<n>" and the merges' "merge_<method>").
RESERVED_IDS = (
    "none", "other", "effect", "general", "student", "critic", "teacher", "cascade", "fused", "collection",
    "acceleration", "fm_all_in_one", "fm_all_in_one_training", "teacher_in_training", "teacher_slot_*", "merge_*",
)
MAX_ID_LENGTH = 64  # ids name folders, adapters and report columns
MAX_PROMPT_LENGTH = 1000  # characters of a prompt (the text encoder sees far fewer tokens anyway)
MAX_CRITERIA_LENGTH = 2000
MAX_MANIFEST_BYTES = 16 << 20  # bank.yaml; a 50-effect manifest is ~12 kB
MAX_YAML_DEPTH = 16  # the manifest schema nests 4 levels deep
# A hub id: optional namespace, a name; letters, digits, '_', '.', '-' (huggingface_hub's rule, 96 characters each).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseSpec(_Strict):
    """Exactly one of: `path` (a diffusers pipeline folder under the root) or `model` (hub id / absolute path)."""

    path: str | None = None
    model: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> BaseSpec:
        if (self.path is None) == (self.model is None):
            raise ValueError("give exactly one of 'path' or 'model'")
        return self


class GeneralSpec(_Strict):
    sources: str
    instructions: str


class EffectSpec(_Strict):
    id: str = Field(pattern=r"^[a-z0-9_]+$", max_length=MAX_ID_LENGTH)
    category: str = Field(min_length=1)
    prompt: str
    teacher: str
    pairs: str
    criteria: str | None = None  # what a correct edit shows, for an MLLM judge (default: from the prompt)


class BankSpec(_Strict):
    version: Literal[1]
    name: str = Field(min_length=1)
    base: BaseSpec
    judge: str | None = None
    # a few-step LoRA of the base (e.g. a Lightning LoRA): the cascade baseline stacks it on a teacher
    acceleration: str | None = None
    general: GeneralSpec
    eval: str
    effects: list[EffectSpec] = Field(min_length=1)


@dataclass(frozen=True)
class Effect:
    id: str
    category: str
    prompt: str
    teacher: Path
    pairs_dir: Path
    pairs: tuple[tuple[Path, Path], ...]
    criteria: str


@dataclass(frozen=True)
class Bank:
    """A loaded bank: resolved paths (as root / relative path) and the images on demand."""

    manifest: Path
    root: Path
    spec: BankSpec
    image_size: int
    base_dir: Path | None  # a local diffusers pipeline folder, when there is one
    judge: Path | None
    acceleration: Path | None
    general_sources: tuple[Path, ...]
    instructions_file: Path
    instructions: tuple[str, ...]
    eval_sources: tuple[Path, ...]
    effects: tuple[Effect, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    def effect(self, effect_id: str) -> Effect:
        for effect in self.effects:
            if effect.id == effect_id:
                return effect
        raise BankError(f"{self.manifest}: effects: no effect with id '{effect_id}'")

    def load_pairs(self, effect: Effect) -> tuple[torch.Tensor, torch.Tensor]:
        """(sources, results), each [N, 3, S, S] in [0, 1]."""
        return _load_pair_images(effect.pairs, self.image_size)

    def load_general_sources(self) -> torch.Tensor:
        return torch.stack([load_png(path, self.image_size) for path in self.general_sources])

    def load_eval_sources(self) -> torch.Tensor:
        return torch.stack([load_png(path, self.image_size) for path in self.eval_sources])

    def relative(self, path: Path) -> str:
        """The path as written relative to the root (posix), for manifests and hashes."""
        return path.relative_to(self.root).as_posix()


def open_bank(config: BankConfig) -> Bank:
    """The bank params.yaml names: its manifest, image size and effect subset (`bank.effects`, `bank.max_effects`)."""
    return load_bank(config.manifest, config.image_size, config.max_effects, config.effects)


def load_bank(manifest_path: Path, image_size: int, max_effects: int | None = None, effect_ids: list[str] | None = None) -> Bank:
    """Parse and structurally check a bank (only the effects `effect_ids` names, then only the first
    `max_effects`, when given); every error is one line naming the file and field."""
    manifest_path = Path(manifest_path)
    root = manifest_path.parent
    spec = _parse_spec(manifest_path)
    if effect_ids is not None:
        listed = [item.id for item in spec.effects]
        unknown = [effect_id for effect_id in effect_ids if effect_id not in listed]
        if unknown:
            raise BankError(f"{manifest_path}: effects: bank.effects names {', '.join(unknown)}, not in the manifest (it lists {', '.join(listed)})")
        spec = spec.model_copy(update={"effects": [item for item in spec.effects if item.id in set(effect_ids)]})
    if max_effects is not None:
        if max_effects > len(spec.effects):
            raise BankError(f"{manifest_path}: effects: bank.max_effects is {max_effects} but the manifest lists {len(spec.effects)}")
        spec = spec.model_copy(update={"effects": spec.effects[:max_effects]})
    refuse_pickle_files(root)
    resolver = _Resolver(manifest_path, root)

    seen: dict[str, int] = {}
    effects = []
    for i, item in enumerate(spec.effects):
        if item.id in seen:
            raise BankError(f"{manifest_path}: effects[{i}].id: duplicate effect id '{item.id}'")
        seen[item.id] = i
        if is_reserved(item.id):
            raise BankError(f"{manifest_path}: effects[{i}].id: '{item.id}' is reserved (the code uses it; reserved: {', '.join(RESERVED_IDS)})")
        _check_text(f"{manifest_path}: effects[{i}].prompt", item.prompt, MAX_PROMPT_LENGTH, "empty prompt")
        _check_text(f"{manifest_path}: effects[{i}].category", item.category, MAX_ID_LENGTH, "empty category")
        teacher = resolver.file(f"effects[{i}].teacher", item.teacher)
        if os.path.lexists(teacher.parent / ADAPTER_CONFIG):  # read with the teacher (its alphas): a bank file too
            resolver.inside(teacher.parent / ADAPTER_CONFIG, f"{teacher.parent / ADAPTER_CONFIG}: file")
            regular_file(teacher.parent / ADAPTER_CONFIG)
        pairs_dir = resolver.folder(f"effects[{i}].pairs", item.pairs)
        if item.criteria is not None:
            _check_text(f"{manifest_path}: effects[{i}].criteria", item.criteria, MAX_CRITERIA_LENGTH, "empty criteria (leave the field out for the default)")
        criteria = item.criteria or default_criteria(item.prompt)
        effects.append(
            Effect(item.id, item.category, item.prompt, teacher, pairs_dir, _pair_files(resolver, pairs_dir), criteria)
        )

    if spec.base.path is not None:
        base_dir: Path | None = resolver.folder("base.path", spec.base.path)
    else:
        base_dir = _base_model_dir(manifest_path, spec.base.model)

    instructions_file = resolver.file("general.instructions", spec.general.instructions)
    return Bank(
        manifest=manifest_path,
        root=root,
        spec=spec,
        image_size=image_size,
        base_dir=base_dir,
        judge=None if spec.judge is None else resolver.folder("judge", spec.judge),
        acceleration=None if spec.acceleration is None else resolver.file("acceleration", spec.acceleration),
        general_sources=_png_files(resolver, resolver.folder("general.sources", spec.general.sources)),
        instructions_file=instructions_file,
        instructions=_read_instructions(instructions_file),
        eval_sources=_png_files(resolver, resolver.folder("eval", spec.eval)),
        effects=tuple(effects),
    )


def is_reserved(effect_id: str) -> bool:
    """Whether an effect id is one of RESERVED_IDS (an entry ending in '*' reserves the prefix before it)."""
    return any(effect_id == name or (name.endswith("*") and effect_id.startswith(name[:-1])) for name in RESERVED_IDS)


def _check_text(where: str, value: str, limit: int, empty: str) -> None:
    """Manifest text (prompt, category, criteria): bounded, no control characters (NUL...), something visible."""
    if len(value) > limit:
        raise BankError(f"{where}: {len(value)} characters, more than {limit}")
    control = next((c for c in value if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None)
    if control is not None:
        raise BankError(f"{where}: control character U+{ord(control):04X} not allowed")
    if not any(unicodedata.category(c)[0] not in "CZM" and not c.isspace() for c in value):
        raise BankError(f"{where}: {empty} (only whitespace, control or invisible characters)")


def _base_model_dir(manifest: Path, value: str) -> Path | None:
    """`base.model`: an absolute path to an existing local pipeline folder (returned), or a well-formed hub id
    (None: loaded by name). A URL, an empty string, '..' or a missing folder is refused."""
    where = f"{manifest}: base.model"
    hint = "give a hub id (org/name) or the absolute path of a local diffusers pipeline folder"
    if not value.strip():
        raise BankError(f"{where}: empty; {hint}")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value) and not Path(value).is_absolute():
        raise BankError(f"{where}: '{value[:80]}' is a URL, not a base reference; {hint}")
    path = Path(value)
    if ".." in path.parts:
        raise BankError(f"{where}: path '{value[:80]}' contains '..'; {hint}")
    if path.is_absolute():
        check_name_lengths(value, where)
        if not path.is_dir():
            raise BankError(f"{where}: no local folder {value[:200]}; {hint}")
        return path
    if "--" in value or ".." in value or not _HUB_ID.match(value):
        raise BankError(f"{where}: '{value[:80]}' is neither a well-formed hub id nor an absolute path; {hint}")
    return None


def default_criteria(prompt: str) -> str:
    """An effect's judging criteria when the manifest gives none: the instruction, plainly applied."""
    return (
        f"The result must clearly show this edit: {prompt.strip().rstrip('.')}. The subject, layout and content of "
        "the source must stay recognisable; nothing else may change."
    )


def _parse_spec(manifest_path: Path) -> BankSpec:
    if regular_file(manifest_path).st_size > MAX_MANIFEST_BYTES:
        raise BankError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES} bytes; not a bank manifest")
    try:
        data = manifest_path.read_bytes()
    except OSError as error:
        raise BankError(f"{manifest_path}: cannot read ({error.strerror})") from error
    text = decode_utf8(manifest_path, data)
    if "\x00" in text:
        raise BankError(f"{manifest_path}: line {text[: text.index(chr(0))].count(chr(10)) + 1}: NUL character in the YAML")
    try:
        _check_depth(manifest_path, text)
        raw = load_yaml(text)  # yamlfile.py: the loader params.yaml uses too (duplicate keys refused)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise BankError(f"{manifest_path}: {where}invalid YAML ({' '.join(str(problem).split())})") from error
    if not isinstance(raw, dict):
        raise BankError(f"{manifest_path}: expected a mapping at the top level")
    try:
        return BankSpec.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        field = _field_path(first["loc"])
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        elif first["type"] == "missing":
            message = "missing key"
        else:
            message = first["msg"]
        raise BankError(f"{manifest_path}: {field or '<top>'}: {message}") from error


def _check_depth(manifest_path: Path, text: str) -> None:
    """Refuse deep nesting from the parser's events (iterative), before the recursive composer sees it."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise BankError(f"{manifest_path}: line {event.start_mark.line + 1}: YAML nested deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def decode_utf8(path: Path, data: bytes) -> str:
    """Decode strictly, naming the line and byte of the first invalid sequence."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise BankError(f"{path}: not valid UTF-8 (line {line}, byte {error.start})") from error


class _Resolver:
    """Resolve manifest paths: relative, no '..', inside the root after symlinks, existing."""

    def __init__(self, manifest: Path, root: Path):
        self.manifest = manifest
        self.root = root
        self.real_root = root.resolve()

    def _resolve(self, field: str, value: str) -> Path:
        if not value:
            raise BankError(f"{self.manifest}: {field}: empty path")
        check_name_lengths(value, f"{self.manifest}: {field}")
        relative = Path(value)
        if relative.is_absolute():
            raise BankError(
                f"{self.manifest}: {field}: absolute path '{value}' not allowed; paths are relative to the bank root"
            )
        if ".." in relative.parts:
            raise BankError(f"{self.manifest}: {field}: path '{value}' escapes the bank root ('..')")
        path = self.root / relative
        self.inside(path, f"{self.manifest}: {field}: path '{value}'")
        return path

    def inside(self, path: Path, where: str) -> None:
        """A symlink anywhere along the path must not lead outside the root."""
        inside(path, self.real_root, where)

    def file(self, field: str, value: str) -> Path:
        path = self._resolve(field, value)
        if not os.path.lexists(path):
            raise BankError(f"{self.manifest}: {field}: missing file {path}")
        regular_file(path, f"{self.manifest}: {field}: {path}")
        return path

    def folder(self, field: str, value: str) -> Path:
        path = self._resolve(field, value)
        if not path.is_dir():
            raise BankError(f"{self.manifest}: {field}: missing folder {path}")
        return path


def _pair_files(resolver: _Resolver, folder: Path) -> tuple[tuple[Path, Path], ...]:
    """NNNN_source.png + NNNN_result.png, matched one to one; anything else in the folder is an error."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = _PAIR_FILE.match(path.name)
        if match is None:
            raise BankError(f"{path}: unexpected entry in a pairs folder (expected NNNN_source.png / NNNN_result.png)")
        resolver.inside(path, f"{path}: file")
        regular_file(path)
        found.setdefault(match["index"], {})[match["role"]] = path
    if not found:
        raise BankError(f"{folder}: no pairs (expected NNNN_source.png + NNNN_result.png)")
    pairs = []
    for index in sorted(found, key=int):
        roles = found[index]
        for role, other in (("source", "result"), ("result", "source")):
            if role not in roles:
                raise BankError(f"{roles[other]}: unmatched pair file (no {index}_{role}.png)")
        pairs.append((roles["source"], roles["result"]))
    return tuple(pairs)


def read_pair_folder(folder: Path, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's folder of pairs outside any bank, checked like a bank's: (sources, results) [N, 3, S, S]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BankError(f"{folder}: not a folder of pairs")
    refuse_pickle_files(folder)
    return _load_pair_images(_pair_files(_Resolver(folder, folder), folder), image_size)


def _load_pair_images(pairs: tuple[tuple[Path, Path], ...], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    sources = torch.stack([load_png(source, image_size) for source, _ in pairs])
    return sources, torch.stack([load_png(result, image_size) for _, result in pairs])


def _png_files(resolver: _Resolver, folder: Path) -> tuple[Path, ...]:
    files = []
    for path in sorted(folder.iterdir()):
        if path.suffix != ".png":
            raise BankError(f"{path}: unexpected entry in an image folder (expected *.png files)")
        resolver.inside(path, f"{path}: file")
        regular_file(path)
        files.append(path)
    if not files:
        raise BankError(f"{folder}: no PNG images")
    return tuple(files)


def _read_instructions(path: Path) -> tuple[str, ...]:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BankError(f"{path}: cannot read ({error.strerror})") from error
    lines = tuple(line.strip() for line in decode_utf8(path, data).splitlines() if line.strip())
    if not lines:
        raise BankError(f"{path}: no instructions (one per line expected)")
    return lines


def refuse_pickle_files(root: Path) -> None:
    """Pickle files can run code when loaded; none may sit anywhere in the bank."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in PICKLE_SUFFIXES:
                raise BankError(f"{Path(folder) / name}: pickle files are refused; convert to safetensors")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise BankError(f"{path}: cannot read ({error.strerror})") from error
    return digest.hexdigest()


def tree_hashes(root: Path, bank_root: Path | None = None) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by posix path relative to it, in sorted order. Only regular
    files are read (a FIFO or a device is refused by `stat`); with `bank_root`, no symlink may leave it."""
    hashes = {}
    for path in walk_regular_files(Path(root), bank_root):
        hashes[path.relative_to(root).as_posix()] = file_sha256(path)
    return dict(sorted(hashes.items()))
