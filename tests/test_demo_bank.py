"""The demo-bank builder: deterministic, resumable, and its output validates."""

from __future__ import annotations

import json

import yaml

from collectionlora.bank import tree_hashes
from collectionlora.demo_bank import ACCELERATION, KEY_FILE, build_demo_bank
from collectionlora.distill.acceleration import acceleration_config
from collectionlora.stages import run_validate


def test_build_is_deterministic_resumable_and_validates(tiny_params, tmp_path):
    first = build_demo_bank(tiny_params, tmp_path / "one" / "data")
    assert [v.id for v in first if v.passed][:3] == [v.id for v in first][:3]
    root = tmp_path / "one" / "data"
    default = yaml.safe_load((root / "bank.yaml").read_text())
    fifty = yaml.safe_load((root / "bank-3.yaml").read_text())
    assert len(default["effects"]) == 2 and len(fifty["effects"]) == 3
    assert {e["id"] for e in default["effects"]} <= {e["id"] for e in fifty["effects"]}
    report = json.loads((root / "build_report.json").read_text())
    assert len(report) == 3 and all("judge_rate" in r for r in report)

    for manifest in ("bank.yaml", "bank-3.yaml"):
        bank = tiny_params.bank.model_copy(update={"root": root, "manifest": root / manifest})
        result = run_validate(bank, tmp_path / "validated" / manifest, None)
        assert len(result["effects"]) == len(yaml.safe_load((root / manifest).read_text())["effects"])

    # A second build from the same params is byte-identical.
    build_demo_bank(tiny_params, tmp_path / "two" / "data")
    assert tree_hashes(root) == tree_hashes(tmp_path / "two" / "data")

    # The student's budget is not an input of the acceleration LoRA: a rebuild keeps it; its lr is.
    marker = tmp_path / "one" / "data.build" / ACCELERATION / KEY_FILE
    trained = marker.stat().st_mtime_ns
    budget = {"max_steps": tiny_params.distill.max_steps + 1, "anchor_steps": 3}
    build_demo_bank(tiny_params.model_copy(update={"distill": tiny_params.distill.model_copy(update=budget)}), root)
    assert marker.stat().st_mtime_ns == trained
    assert acceleration_config(tiny_params) != acceleration_config(
        tiny_params.model_copy(update={"distill": tiny_params.distill.model_copy(update={"lr": 2 * tiny_params.distill.lr})})
    )
