"""Files of a bank checked before anything reads them: only regular files (a FIFO or a device would hang
or flood a read), symlinks that stay inside their root, whole safetensors files, sane sharded indexes.

Everything here works from `stat` and file headers: nothing is opened that is not a regular file, and
no tensor data is read.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from safetensors import SafetensorError, safe_open

from collectionlora.errors import BankError

MAX_NAME_BYTES = 255  # one path component (NAME_MAX of Linux and macOS file systems)
MAX_INDEX_BYTES = 64 << 20  # a sharded safetensors index is a small JSON file listing tensor names
_INDEX_SUFFIX = ".safetensors.index.json"


def regular_file(path: Path, where: str | None = None) -> os.stat_result:
    """`stat` of the file `path` names (symlinks followed, nothing opened); anything but a regular file is
    refused, so that a FIFO, a socket or a link to /dev/zero never reaches a read."""
    where = where or str(path)
    try:
        info = os.stat(path)
    except OSError as error:
        raise BankError(f"{where}: cannot stat ({error.strerror})") from error
    if not stat.S_ISREG(info.st_mode):
        raise BankError(f"{where}: not a regular file ({_kind(info.st_mode)}); refused without opening it")
    return info


def check_name_lengths(path: str, where: str) -> None:
    """Refuse a path component the file system cannot hold, with one line instead of an OSError later."""
    for part in Path(path).parts:
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise BankError(f"{where}: path component '{part[:40]}...' is longer than {MAX_NAME_BYTES} bytes")


def inside(path: Path, root: Path, where: str) -> Path:
    """The real path of `path`, refused when a symlink along it leads outside `root`."""
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop (Python < 3.13)
        raise BankError(f"{where}: cannot resolve ({' '.join(str(error).split())})") from error
    if not real.is_relative_to(root.resolve()):
        raise BankError(f"{where} escapes the bank root (resolves to {real})")
    return real


def walk_regular_files(folder: Path, root: Path | None) -> list[Path]:
    """Every file under `folder` (sorted, as paths under it), symlinked folders followed once. Special files
    are refused by `stat` alone; with `root`, so is any symlink leading outside it."""
    files: list[Path] = []
    seen: set[Path] = set()

    def visit(directory: Path) -> None:
        real = directory.resolve()
        if real in seen:
            raise BankError(f"{directory}: symlink loop (this folder is reached twice)")
        seen.add(real)
        for path in sorted(directory.iterdir()):
            if path.is_symlink() and root is not None:
                inside(path, root, f"{path}: symlink")
            try:
                mode = os.stat(path).st_mode
            except OSError as error:
                raise BankError(f"{path}: cannot stat ({error.strerror}; a dangling symlink?)") from error
            if stat.S_ISDIR(mode):
                visit(path)
            elif stat.S_ISREG(mode):
                files.append(path)
            else:
                raise BankError(f"{path}: not a regular file ({_kind(mode)}); refused without opening it")

    visit(folder)
    return files


def check_safetensors_file(path: Path) -> None:
    """Header parsed and checked against the file's size (a truncated file fails here), no tensor read."""
    regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise BankError(f"{path}: not a valid safetensors file, truncated or corrupt ({' '.join(str(error).split())})") from error


def weight_map_files(index: Path, root: Path | None) -> list[Path]:
    """The shard files a `*.safetensors.index.json` names: plain file names beside the index (a name with
    '..', an absolute path or a sub-folder is refused), existing, and with `root` resolving inside it."""
    folder = index.parent
    info = regular_file(index)
    if info.st_size > MAX_INDEX_BYTES:
        raise BankError(f"{index}: {info.st_size} bytes, more than an index needs ({MAX_INDEX_BYTES})")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise BankError(f"{index}: cannot read weight_map ({' '.join(str(error).split())})") from error
    if not isinstance(weight_map, dict) or not weight_map:
        raise BankError(f"{index}: weight_map: expected a non-empty mapping of tensor name -> shard file")
    files = []
    for name in sorted(set(map(str, weight_map.values()))):
        if not name or Path(name).name != name or name in (".", ".."):
            raise BankError(f"{index}: weight_map: shard '{name}' is not a plain file name beside the index")
        if not name.endswith(".safetensors"):
            raise BankError(f"{index}: weight_map: shard '{name}' is not a .safetensors file")
        check_name_lengths(name, f"{index}: weight_map")
        path = folder / name
        if root is not None:
            inside(path, root, f"{index}: weight_map: shard '{name}'")
        if not path.exists():
            raise BankError(f"{index}: weight_map: shard '{name}' is missing")
        files.append(path)
    return files


def check_model_tree(folder: Path, root: Path | None) -> list[Path]:
    """A model folder (a diffusers base, a judge): regular files only, symlinks inside `root`, every
    safetensors file whole, every sharded index naming shards beside it. Returns its files."""
    files = walk_regular_files(folder, root)
    for path in files:
        if path.name.endswith(".safetensors"):
            check_safetensors_file(path)
        elif path.name.endswith(_INDEX_SUFFIX):
            weight_map_files(path, root)
    return files


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"
