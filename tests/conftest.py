"""Shared pytest fixtures."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bankfactory import build_bank


@pytest.fixture(scope="session")
def bank_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid bank built once per session; copy it (see `valid_bank`) before changing anything."""
    root = tmp_path_factory.mktemp("bank_template") / "bank"
    return build_bank(root)


@pytest.fixture
def valid_bank(bank_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the valid bank at tmp_path/bank; returns its bank.yaml."""
    root = tmp_path / "bank"
    shutil.copytree(bank_template.parent, root, symlinks=True)
    return root / bank_template.name
