"""Output paths checked before any work: an `--out` that names a file where a folder goes (or the
reverse), or that lies in a folder nobody may write, is one line before a model loads instead of a
traceback after minutes of compute. Missing parent folders are no error: they are created when the
output is written, as every stage creates its --out folder."""

from __future__ import annotations

import os
from pathlib import Path

from collectionlora.errors import OutputError


def check_output_folder(path: Path, option: str = "--out") -> None:
    """`path` can become an output folder: it is a folder or absent, and the nearest existing folder
    on its way is writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: {option}: is a file, not a folder")
    _check_writable(path, option)


def check_output_file(path: Path, option: str = "--out") -> None:
    """`path` can be written as a file: it is not a folder, and the nearest existing folder on its way is writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; {option} names the file to write")
    _check_writable(path.parent, option)


def _check_writable(folder: Path, option: str) -> None:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise OutputError(f"{folder}: {option}: cannot be created, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{existing}: {option}: not writable (read-only or no permission); choose another path or fix its permissions")
