"""`make setup`: the pinned lock into .venv, and on request torch from another pip index (PyTorch's CPU
wheels where PyPI's torch would be the CUDA build); by default nothing but pip's own configuration."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import REPO

CPU_INDEX = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def setup_commands(*variables: str) -> list[str]:
    """The commands `make setup` would run from scratch (a dry run: nothing is installed)."""
    result = subprocess.run(
        ["make", "--dry-run", "--always-make", "setup", *variables], cwd=REPO, capture_output=True, text=True, check=True
    )
    return [line for line in result.stdout.splitlines() if "pip install" in line]


def test_by_default_torch_comes_with_the_lock_from_pips_own_configuration():
    commands = setup_commands()
    assert not [c for c in commands if "--index-url" in c or "download.pytorch.org" in c], commands
    assert any("-r requirements.lock" in c for c in commands)


def test_torch_index_url_installs_the_locks_torch_from_that_index_first():
    commands = setup_commands(f"TORCH_INDEX_URL={CPU_INDEX}")
    torch_install = next(i for i, c in enumerate(commands) if f"--index-url {CPU_INDEX}" in c)
    lock_install = next(i for i, c in enumerate(commands) if "-r requirements.lock" in c)
    assert torch_install < lock_install
    command = commands[torch_install]
    assert "--no-deps" in command and "grep -E '^torch==' requirements.lock" in command  # exactly the lock's torch
    assert re.search(r"^torch==\S+$", (REPO / "requirements.lock").read_text(), re.M)
    assert "TORCH_INDEX_URL" in (REPO / "Makefile").read_text().split("\n\n")[0]  # documented at the top
