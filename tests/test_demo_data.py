"""The committed demo bank: a fresh clone pulls it offline from the in-repo DVC remote, and it validates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from collectionlora.bank import load_bank
from collectionlora.stages import run_validate

REPO = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).with_name("dvc")


def test_fresh_clone_pulls_the_bank_offline_and_it_validates(tiny_params, tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([str(DVC), "pull", "-q", "data.dvc"], cwd=clone, check=True, env=env)
    config = (clone / ".dvc" / "config").read_text()
    assert "analytics = false" in config and "check_update = false" in config

    manifests = sorted((clone / "data").glob("bank*.yaml"))
    assert clone / "data" / "bank.yaml" in manifests
    for manifest in manifests:
        bank_config = tiny_params.bank.model_copy(update={"root": clone / "data", "manifest": manifest})
        result = run_validate(bank_config, tmp_path / manifest.stem, clone / "data.dvc")
        assert result["data_dvc_md5"] == yaml.safe_load((clone / "data.dvc").read_text())["outs"][0]["md5"]
        bank = load_bank(manifest, tiny_params.bank.image_size)
        assert all(len(effect.pairs) >= 20 for effect in bank.effects)
    default = load_bank(clone / "data" / "bank.yaml", tiny_params.bank.image_size)
    assert len(default.effects) == 12
