"""LoRA files: safetensors only, every known key layout normalised to one form, checked against the base.

Canonical form: module path relative to the transformer (`transformer_blocks.0.attn.to_q`) ->
A [r, in], B [out, r] and alpha (effective scale alpha/r). Reading a file parses its header only;
tensors stay in the memory-mapped file until asked for, so host memory does not grow with the
number of teachers. Every tensor read is checked for NaN/inf.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from collectionlora.errors import BankError, LoraFileError
from collectionlora.safefiles import check_safetensors_file, regular_file, weight_map_files

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib"})
# LoRA matrices must be floating point; an integer or bool tensor is no trained adapter (safetensors dtype names).
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
MAX_CONFIG_BYTES = 16 << 20  # adapter_config.json: a few kB in practice
# rank_pattern / alpha_pattern keys are regular expressions matched against module paths: bounded length, a
# small alphabet (no backreferences, no {m,n}), no quantified groups and few quantifiers, so none can backtrack
# for long (a polynomial of low degree in a module path's length).
MAX_PATTERN_LENGTH = 256
MAX_PATTERN_QUANTIFIERS = 3
_PATTERN_ALPHABET = re.compile(r"^(?:[A-Za-z0-9_.|()*+?^$\[\]!:=-]|\\[.\-_dw])+$")
WriteLayout = Literal["diffusers", "peft", "kohya"]

# Where diffusers keeps a LoRA's peft config inside the safetensors header (`save_lora_weights`).
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
ADAPTER_CONFIG = "adapter_config.json"

# Key prefix -> layout name; longest first so `model.base_model.model.` wins over `base_model.model.`.
_PREFIXES = (
    ("model.base_model.model.", "peft"),
    ("base_model.model.", "peft"),
    ("transformer.", "diffusers"),
    ("diffusion_model.", "comfyui"),
    ("lora_unet_", "kohya"),
)
_KEY = re.compile(
    r"^(?P<module>.+?)\."
    r"(?:(?P<role>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?\.weight|(?P<alpha>alpha))$"
)
_DOWN = {"lora_A", "lora_down"}


@dataclass(frozen=True)
class LoraModule:
    """One adapted Linear: where its tensors live in the source and what they look like."""

    rank: int
    in_features: int
    out_features: int
    alpha: float
    a_key: str
    b_key: str

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraWeights:
    """A LoRA in canonical form. Tensors come from the memory-mapped file (or memory) on demand."""

    def __init__(
        self,
        source: str,
        layout: str,
        modules: dict[str, LoraModule],
        tensors: dict[str, torch.Tensor] | None,
    ):
        self.source = source
        self.layout = layout
        self.modules = dict(sorted(modules.items()))
        self._tensors = tensors

    @classmethod
    def from_tensors(cls, modules: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]) -> LoraWeights:
        """In-memory weights (module -> (A, B, alpha or None meaning alpha = rank)), e.g. freshly trained."""
        tensors: dict[str, torch.Tensor] = {}
        entries: dict[str, LoraModule] = {}
        for name, (down, up, alpha) in modules.items():
            a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            _check_pair("<memory>", a_key, tuple(down.shape), b_key, tuple(up.shape))
            rank = down.shape[0]
            tensors[a_key], tensors[b_key] = down.detach(), up.detach()
            entries[name] = LoraModule(
                rank, down.shape[1], up.shape[0], float(rank if alpha is None else alpha), a_key, b_key
            )
        weights = cls("<memory>", "memory", entries, tensors)
        weights.check_values()
        return weights

    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in self.modules.items()}

    def alphas(self) -> dict[str, float]:
        return {name: m.alpha for name, m in self.modules.items()}

    def pairs(self, check_values: bool = True) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(module, A, B) for every module, one module in memory at a time; `check_values=False` skips the
        NaN/inf check for a file already read once (a teacher reloaded into its slot many times)."""
        if self._tensors is not None:
            for name, entry in self.modules.items():
                yield name, self._tensors[entry.a_key], self._tensors[entry.b_key]
            return
        read = self._checked if check_values else (lambda key, handle: handle.get_tensor(key))
        try:
            with safe_open(self.source, framework="pt") as handle:
                for name, entry in self.modules.items():
                    yield name, read(entry.a_key, handle), read(entry.b_key, handle)
        except (SafetensorError, OSError) as error:
            raise LoraFileError(f"{self.source}: cannot read tensors ({_one_line(error)})") from error

    def check_values(self) -> None:
        """Read every tensor once (one module at a time), so that NaN/inf fail now rather than mid-training."""
        for _ in self.pairs():
            pass

    def _read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if self._tensors is not None:
            return {key: self._tensors[key] for key in keys}
        try:
            with safe_open(self.source, framework="pt") as handle:
                return {key: self._checked(key, handle) for key in keys}
        except (SafetensorError, OSError) as error:
            raise LoraFileError(f"{self.source}: cannot read tensors ({_one_line(error)})") from error

    def _checked(self, key: str, handle) -> torch.Tensor:
        tensor = handle.get_tensor(key)
        if not torch.isfinite(tensor).all():
            raise LoraFileError(f"{self.source}: tensor {key}: contains non-finite values (NaN or inf)")
        return tensor


def refuse_pickle(path: Path) -> None:
    """Pickle files can run code when loaded: refuse them by suffix and by their first bytes."""
    message = f"{path}: pickle files are refused; convert to safetensors"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFileError(message)
    _regular_file(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError as error:
        raise LoraFileError(f"{path}: cannot read ({_one_line(error)})") from error
    # Pickle protocol >= 2 starts with PROTO (0x80, version); torch.save writes a zip ("PK").
    if (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head == b"PK":
        raise LoraFileError(message + " (the content is a pickle/zip archive)")


def read_lora(path: Path, base_shapes: dict[str, tuple[int, int]] | None) -> LoraWeights:
    """Read, normalise and fully check a LoRA file (every tensor is read once for NaN/inf)."""
    weights = read_lora_header(path, base_shapes)
    weights.check_values()
    return weights


def read_lora_header(path: Path, base_shapes: dict[str, tuple[int, int]] | None) -> LoraWeights:
    """Normalise keys and check shapes from the header alone; tensor values are checked when read.

    `base_shapes` (module -> (out, in)) enables the shape check against the base and is required to
    resolve kohya's underscore module names.
    """
    path = Path(path)
    refuse_pickle(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            for key in shapes:
                _check_dtype(path, key, handle.get_slice(key).get_dtype())
            metadata = handle.metadata() or {}
            alphas = {key: handle.get_tensor(key) for key in shapes if key.endswith(".alpha") and math.prod(shapes[key]) == 1}
    except (SafetensorError, OSError) as error:
        raise LoraFileError(f"{path}: not a valid safetensors file ({_one_line(error)})") from error
    if not shapes:
        raise LoraFileError(f"{path}: contains no tensors")

    layout, grouped = _group_keys(path, shapes, base_shapes)
    config = _peft_config_source(path, metadata)
    modules: dict[str, LoraModule] = {}
    for module, roles in grouped.items():
        if "down" not in roles or "up" not in roles:
            some_key = next(iter(roles.values()))
            missing = "up" if "down" in roles else "down"
            raise LoraFileError(f"{path}: tensor {some_key}: module {module} lacks its {missing} matrix")
        a_key, b_key = roles["down"], roles["up"]
        _check_pair(str(path), a_key, shapes[a_key], b_key, shapes[b_key])
        rank, in_features = shapes[a_key]
        out_features = shapes[b_key][0]
        if base_shapes is not None:
            if module not in base_shapes:
                raise LoraFileError(f"{path}: tensor {a_key}: module {module} is not a Linear of the base")
            base_out, base_in = base_shapes[module]
            if in_features != base_in:
                raise LoraFileError(
                    f"{path}: tensor {a_key}: shape {list(shapes[a_key])} does not fit base module {module} "
                    f"(out={base_out}, in={base_in})"
                )
            if out_features != base_out:
                raise LoraFileError(
                    f"{path}: tensor {b_key}: shape {list(shapes[b_key])} does not fit base module {module} "
                    f"(out={base_out}, in={base_in})"
                )
        if "alpha" in roles:
            alpha = _alpha_value(path, roles["alpha"], alphas.get(roles["alpha"]))
        elif config is not None:
            alpha = _alpha_from_config(config, module, rank)
        else:
            alpha = float(rank)
        modules[module] = LoraModule(rank, in_features, out_features, alpha, a_key, b_key)
    return LoraWeights(str(path), layout, modules, None)


def _group_keys(
    path: Path, shapes: dict[str, tuple[int, ...]], base_shapes: dict[str, tuple[int, int]] | None
) -> tuple[str, dict[str, dict[str, str]]]:
    """Map every key to (module, role); one layout and one adapter name per file, no duplicates."""
    kohya_names = _kohya_names(base_shapes)
    layout: str | None = None
    adapter: str | None = None
    grouped: dict[str, dict[str, str]] = {}
    for key in sorted(shapes):
        key_layout, rest = "plain", key
        for prefix, name in _PREFIXES:
            if key.startswith(prefix):
                key_layout, rest = name, key[len(prefix) :]
                break
        match = _KEY.match(rest)
        if match is None:
            raise LoraFileError(f"{path}: unknown LoRA key {key}")
        if layout is None:
            layout = key_layout
        elif key_layout != layout:
            raise LoraFileError(f"{path}: key {key}: {key_layout} layout mixed with {layout} keys in one file")
        if match["adapter"] is not None:
            if adapter is None:
                adapter = match["adapter"]
            elif match["adapter"] != adapter:
                raise LoraFileError(f"{path}: key {key}: second adapter name '{match['adapter']}' (first '{adapter}')")
        module = match["module"]
        if key_layout == "kohya":
            if kohya_names is None:
                raise LoraFileError(
                    f"{path}: key {key}: kohya module names need the base's module names to resolve"
                )
            if module not in kohya_names:
                raise LoraFileError(f"{path}: unknown LoRA key {key} (no single base module flattens to {module})")
            module = kohya_names[module]
        role = "alpha" if match["alpha"] else ("down" if match["role"] in _DOWN else "up")
        roles = grouped.setdefault(module, {})
        if role in roles:
            raise LoraFileError(f"{path}: key {key}: duplicates {roles[role]} for module {module}")
        roles[role] = key
    assert layout is not None
    return layout, grouped


def _kohya_names(base_shapes: dict[str, tuple[int, int]] | None) -> dict[str, str] | None:
    """kohya flattens `a.b_c.0` to `a_b_c_0`; invert that against the real names, ambiguity excluded."""
    if base_shapes is None:
        return None
    flat = Counter(name.replace(".", "_") for name in base_shapes)
    return {name.replace(".", "_"): name for name in base_shapes if flat[name.replace(".", "_")] == 1}


def _check_pair(source: str, a_key: str, a_shape: tuple, b_key: str, b_shape: tuple) -> None:
    for key, shape in ((a_key, a_shape), (b_key, b_shape)):
        if len(shape) != 2:
            raise LoraFileError(f"{source}: tensor {key}: expected a 2-D matrix, got shape {list(shape)}")
    if a_shape[0] != b_shape[1]:
        raise LoraFileError(
            f"{source}: tensor {b_key}: shape {list(b_shape)} does not match rank {a_shape[0]} of {a_key}"
        )


def _check_dtype(path: Path, key: str, dtype: str) -> None:
    """A/B matrices must be floating point; a kohya `.alpha` scalar may also be an integer (`torch.tensor(8)`)."""
    if dtype in FLOAT_DTYPES or (key.endswith(".alpha") and dtype[0] in "IU" and dtype[1:].isdigit()):
        return
    raise LoraFileError(f"{path}: tensor {key}: dtype {dtype} is not floating point (expected one of {', '.join(sorted(FLOAT_DTYPES))})")


def _alpha_value(path: Path, key: str, tensor: torch.Tensor | None) -> float:
    if tensor is None:
        raise LoraFileError(f"{path}: tensor {key}: alpha must be a scalar")
    value = float(tensor.float().reshape(()))
    if not (value > 0 and value != float("inf")):
        raise LoraFileError(f"{path}: tensor {key}: alpha must be finite and positive, got {value}")
    return value


@dataclass(frozen=True)
class _PeftSource:
    """The r/alpha part of a peft LoraConfig, with where it came from for error messages."""

    where: str
    r: int
    lora_alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]


def _peft_config_source(path: Path, metadata: dict[str, str]) -> _PeftSource | None:
    """The diffusers metadata in the file header, else adapter_config.json next to the file, else none."""
    if DIFFUSERS_METADATA_KEY in metadata:
        where = f"{path}: metadata {DIFFUSERS_METADATA_KEY}"
        try:
            raw = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        except json.JSONDecodeError as error:
            raise LoraFileError(f"{where}: invalid JSON ({error})") from error
        if isinstance(raw, dict) and any(k.startswith("transformer.") for k in raw):
            raw = {k.removeprefix("transformer."): v for k, v in raw.items() if k.startswith("transformer.")}
        return _parse_peft_config(where, raw)
    config_path = path.parent / ADAPTER_CONFIG
    if os.path.lexists(config_path):
        if _regular_file(config_path).st_size > MAX_CONFIG_BYTES:
            raise LoraFileError(f"{config_path}: larger than {MAX_CONFIG_BYTES} bytes; not an adapter config")
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LoraFileError(f"{config_path}: cannot read ({_one_line(error)})") from error
        return _parse_peft_config(str(config_path), raw)
    return None


def _parse_peft_config(where: str, raw: object) -> _PeftSource:
    if not isinstance(raw, dict):
        raise LoraFileError(f"{where}: expected a JSON object")
    for field in ("use_rslora", "use_dora"):
        if raw.get(field):
            raise LoraFileError(f"{where}: {field}: not supported (plain LoRA only)")
    _check_base_name(where, raw.get("base_model_name_or_path"))
    patterns = {}
    for field, check in (("rank_pattern", _rank), ("alpha_pattern", _alpha)):
        value = raw.get(field) or {}
        if not isinstance(value, dict):
            raise LoraFileError(f"{where}: {field}: expected a mapping")
        patterns[field] = {_checked_pattern(f"{where}: {field}", key): check(f"{where}: {field}[{key!r}]", v) for key, v in value.items()}
    return _PeftSource(
        where, _rank(f"{where}: r", raw.get("r")), _alpha(f"{where}: lora_alpha", raw.get("lora_alpha")),
        patterns["rank_pattern"], patterns["alpha_pattern"],
    )


def _rank(where: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LoraFileError(f"{where}: expected a positive integer rank, got {value!r}")
    return value


def _alpha(where: str, value: object) -> float:
    """alpha/r scales the adapter: NaN, inf, zero or negative would silence, flip or blow it up."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise LoraFileError(f"{where}: expected a finite positive alpha, got {value!r}")
    return float(value)


def _checked_pattern(where: str, pattern: object) -> str:
    """A rank/alpha pattern is a regular expression (peft's rule); only small, non-backtracking ones pass."""
    if not isinstance(pattern, str) or not pattern:
        raise LoraFileError(f"{where}: patterns must be non-empty strings, got {pattern!r}")
    shown = repr(pattern[:60]) + ("..." if len(pattern) > 60 else "")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise LoraFileError(f"{where}: pattern {shown} is longer than {MAX_PATTERN_LENGTH} characters")
    if not _PATTERN_ALPHABET.match(pattern):
        raise LoraFileError(
            rf"{where}: pattern {shown}: only letters, digits, _ . - | ( ) * + ? ^ $ [ ] ! : = and the escapes \. \- \_ \d \w are allowed"
        )
    if re.search(r"\)[*+]", pattern) or pattern.count("*") + pattern.count("+") > MAX_PATTERN_QUANTIFIERS:
        raise LoraFileError(
            f"{where}: pattern {shown}: a quantified group or more than {MAX_PATTERN_QUANTIFIERS} * / + quantifiers "
            "(refused: such patterns can backtrack for a very long time)"
        )
    try:
        re.compile(pattern)
    except re.error as error:
        raise LoraFileError(f"{where}: pattern {shown}: invalid regular expression ({error})") from error
    return pattern


def _check_base_name(where: str, value: object) -> None:
    """peft's base_model_name_or_path is informational here (the bank names the base), but never a URL or a
    path climbing out with '..'."""
    if value is None:
        return
    if not isinstance(value, str) or "://" in value or ".." in Path(value).parts or any(ord(c) < 32 for c in value):
        raise LoraFileError(f"{where}: base_model_name_or_path: {str(value)[:80]!r} is no hub id or local path (URL, '..' or control characters)")


def _pattern_value(where: str, patterns: dict, module: str) -> object | None:
    """peft's own rule (`get_pattern_key`): a pattern matches the end of the module path at a dot."""
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error as error:
            raise LoraFileError(f"{where}: pattern {pattern!r}: invalid regular expression ({error})") from error
    return None


def _alpha_from_config(config: _PeftSource, module: str, rank: int) -> float:
    pattern_rank = _pattern_value(config.where, config.rank_pattern, module)
    expected = config.r if pattern_rank is None else pattern_rank
    if expected != rank:
        raise LoraFileError(f"{config.where}: r: says rank {expected} for {module}, the file has rank {rank}")
    pattern_alpha = _pattern_value(config.where, config.alpha_pattern, module)
    return config.lora_alpha if pattern_alpha is None else pattern_alpha


def peft_config_for(weights: LoraWeights) -> peft.LoraConfig:
    """A LoraConfig injecting exactly these modules with their own ranks and alphas."""
    return peft_config_for_ranks(weights.ranks(), weights.alphas())


def peft_config_for_ranks(ranks: dict[str, int], alphas: dict[str, float]) -> peft.LoraConfig:
    """The most common rank/alpha become r/lora_alpha; the others go to rank_pattern/alpha_pattern keyed
    by the escaped full module path, which peft matches exactly."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alphas.values()).most_common(1)[0][0]
    return peft.LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(ranks),
        rank_pattern={re.escape(n): rank for n, rank in ranks.items() if rank != r},
        alpha_pattern={re.escape(n): alpha for n, alpha in alphas.items() if alpha != lora_alpha},
    )


def to_peft_state_dict(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """Keys as `peft.set_peft_model_state_dict` expects for an adapter injected into the transformer."""
    state: dict[str, torch.Tensor] = {}
    for name, down, up in weights.pairs():
        state[f"{name}.lora_A.weight"] = down
        state[f"{name}.lora_B.weight"] = up
    return state


def _config_dict(weights: LoraWeights) -> dict:
    config = peft_config_for(weights)
    return {
        "peft_type": "LORA",
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "target_modules": sorted(config.target_modules),
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
    }


def write_lora(weights: LoraWeights, path: Path, layout: WriteLayout) -> None:
    """Write atomically in a layout other tools read: diffusers (alphas in the header metadata, as
    `save_lora_weights` does), peft (plus adapter_config.json beside it) or kohya (`.alpha` scalars)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt"}
    for name, down, up in weights.pairs():
        down, up = down.contiguous(), up.contiguous()
        if layout == "diffusers":
            tensors[f"transformer.{name}.lora_A.weight"] = down
            tensors[f"transformer.{name}.lora_B.weight"] = up
        elif layout == "peft":
            tensors[f"base_model.model.{name}.lora_A.weight"] = down
            tensors[f"base_model.model.{name}.lora_B.weight"] = up
        else:
            flat = "lora_unet_" + name.replace(".", "_")
            tensors[f"{flat}.lora_down.weight"] = down
            tensors[f"{flat}.lora_up.weight"] = up
            tensors[f"{flat}.alpha"] = torch.tensor(weights.modules[name].alpha, dtype=torch.float32)
    if layout == "diffusers":
        packed = {f"transformer.{k}": v for k, v in _config_dict(weights).items()}
        metadata[DIFFUSERS_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        save_safetensors(tensors, tmp, metadata)
        _sort_metadata(tmp)
        if layout == "peft":
            atomic_write_text(path.parent / ADAPTER_CONFIG, json.dumps(_config_dict(weights), indent=2, sort_keys=True))

    atomic_write(path, write)


def _sort_metadata(path: Path) -> None:
    """safetensors writes header metadata in hash-map order, which differs between processes; sort it
    in place so that equal LoRAs are equal files (byte-identical resumes, stable DVC hashes)."""
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) > size:  # json.dumps escapes differently from the writer: keep the file as it is
            return
        handle.seek(8)
        handle.write(text + b" " * (size - len(text)))


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, but with the mode of every other file we write (see `ordinary_permissions`),
    and a failed write (disk full, read-only) raised as the OSError it is, naming the file."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from error
    ordinary_permissions(path)


def ordinary_permissions(path: Path) -> None:
    """Give `path` (a file, or a folder and everything in it) the mode an ordinary new file (0666) or
    folder (0777) gets under the umask. safetensors' `save_file` writes through a private temp file and
    keeps its 0600, `tempfile.mkdtemp` makes 0700 folders: artifacts others cannot read (DVC remotes,
    a shared store), unlike the 0644 files beside them."""
    path = Path(path)
    mask = os.umask(0o077)  # Python reads the umask only by setting it; 0o077 is the safe value for that instant
    os.umask(mask)
    for target in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if target.is_symlink():
            continue
        if target.is_dir():  # keep a folder's setgid bit (group-shared trees)
            os.chmod(target, (0o777 & ~mask) | (stat.S_IMODE(target.stat().st_mode) & stat.S_ISGID))
        else:
            os.chmod(target, 0o666 & ~mask)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temp)` a temp file beside `path`, fsync it, rename it to `path`, fsync the folder: readers
    (and the re-run of a killed stage) see the old file or the whole new one, even after a power cut."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def remove_temp_files(folder: Path) -> None:
    """Delete the temp files `atomic_write` leaves under `folder` when its process is killed mid-write
    (call it holding the folder's run lock, runlock.py: no other run is writing one)."""
    for path in Path(folder).rglob(".*.tmp-*"):
        if path.is_file():
            path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file and rename, so readers never see half a file."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_folder(staging: Path, final: Path) -> None:
    """Put the fully written folder `staging` in place of `final` (whole or not at all): its files are
    fsynced, the old `final` is renamed aside and removed after the new one is in place."""
    staging, final = Path(staging), Path(final)
    for item in sorted(staging.rglob("*"), reverse=True):  # files before their folders
        if not item.is_symlink():
            _fsync(item)
    _fsync(staging)
    aside = final.with_name(f".{final.name}.old-{os.getpid()}")
    for leftover in final.parent.glob(f".{final.name}.old-*"):  # of a run killed between the two renames
        shutil.rmtree(leftover, ignore_errors=True)
    if final.exists():
        os.replace(final, aside)
    os.replace(staging, final)
    _fsync(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def base_linear_shapes_from_safetensors(transformer_dir: Path) -> dict[str, tuple[int, int]]:
    """(out, in) of every 2-D `*.weight` from the header(s) of a diffusers `transformer/` folder.

    Only headers are parsed, so checking LoRAs against a 20B base costs no weight I/O.
    """
    shapes: dict[str, tuple[int, int]] = {}
    for file in transformer_weight_files(transformer_dir):
        check_safetensors_file(file)
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    shape = handle.get_slice(key).get_shape()
                    if key.endswith(".weight") and len(shape) == 2:
                        shapes[key.removesuffix(".weight")] = (shape[0], shape[1])
        except (SafetensorError, OSError) as error:
            raise BankError(f"{file}: not a valid safetensors file ({_one_line(error)})") from error
    return shapes


def transformer_weight_files(transformer_dir: Path) -> list[Path]:
    """The safetensors file(s) of a diffusers `transformer/` folder: its sharded index's shards, else the single file."""
    transformer_dir = Path(transformer_dir)
    index = transformer_dir / "diffusion_pytorch_model.safetensors.index.json"
    single = transformer_dir / "diffusion_pytorch_model.safetensors"
    if os.path.lexists(index):
        return weight_map_files(index, None)
    if os.path.lexists(single):
        return [single]
    raise BankError(f"{transformer_dir}: no diffusion_pytorch_model.safetensors(.index.json) found")


def base_linear_shapes(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every nn.Linear of a live model; an adapter-wrapped Linear counts as its base layer."""
    shapes: dict[str, tuple[int, int]] = {}
    wrapped: list[str] = []
    for name, child in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrapped):
            continue
        if isinstance(child, BaseTunerLayer):
            wrapped.append(name)
            child = child.get_base_layer()
        if isinstance(child, torch.nn.Linear):
            shapes[name] = (child.out_features, child.in_features)
    return shapes


def _regular_file(path: Path) -> os.stat_result:
    try:
        return regular_file(path)
    except BankError as error:
        raise LoraFileError(str(error)) from error


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
