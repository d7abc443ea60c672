"""The command line: every command has --help, the catalog prints as JSON, errors are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from collectionlora.effects import catalog

COMMANDS = [
    [], ["effects", "list"], ["demo-bank", "build"], ["teachers", "train"], ["judge", "train"], ["acceleration", "train"],
    ["validate"], ["preview"], ["rollout"], ["distill"], ["edit"], ["baselines"], ["evaluate"],
    ["experiment", "ablations"], ["experiment", "scaling"], ["experiment", "composition"], ["experiment", "incremental"],
    ["pipeline", "compile"], ["pipeline", "upload"], ["pipeline", "run"], ["pipeline", "run-local"],
]


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collectionlora.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_command_has_help(command):
    result = cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_effects_list_json_is_the_catalog():
    records = json.loads(cli("effects", "list", "--json").stdout)
    assert [r["id"] for r in records] == list(catalog())
    assert set(records[0]) == {"id", "category", "stochastic", "prompt"}
    assert len(records) >= 50 and sum(r["stochastic"] for r in records) >= len(records) / 3


def test_bad_params_is_one_line_naming_file_and_field(tmp_path):
    params = yaml.safe_load(open("params.yaml"))
    params["lora"]["rank"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = cli("validate", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    line = result.stderr.strip()
    assert "\n" not in line and "params.yaml" in line and "lora.rank" in line
    assert not (tmp_path / "out").exists()


def test_set_override_reaches_the_stage(valid_bank, tmp_path):
    root = valid_bank.parent
    result = cli("validate", "--set", f"bank.root={root}", "--set", f"bank.manifest={valid_bank}",
                 "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["effects"]
