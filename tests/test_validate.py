"""The validate stage: every bad-bank case fails with one clear line and no manifest; a good bank is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from bankfactory import EFFECTS, PAIRS, apply_mutation

from collectionlora.bank import file_sha256, load_bank, tree_hashes
from collectionlora.config import BankConfig
from collectionlora.errors import BankError
from collectionlora.validate import run_validate

CASES = sorted((Path(__file__).parent / "fixtures" / "bad_banks").glob("*.yaml"))


def bank_config(manifest: Path) -> BankConfig:
    return BankConfig(root=manifest.parent, manifest=manifest, image_size=32, min_pairs=1, max_effects=None, effects=None)


def test_corpus_is_large_enough():
    assert len(CASES) >= 15


@pytest.mark.parametrize("case_file", CASES, ids=[c.stem for c in CASES])
def test_bad_bank_is_refused(case_file: Path, valid_bank: Path, tmp_path: Path):
    case = yaml.safe_load(case_file.read_text(encoding="utf-8"))
    assert case["name"] == case_file.stem
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"stale": true}')  # a stale success must not survive
    apply_mutation(valid_bank.parent, case["mutation"])
    with pytest.raises(BankError) as caught:
        run_validate(bank_config(valid_bank), out, None)
    message = str(caught.value)
    assert "\n" not in message
    assert case["expect_error_substring"] in message
    assert case["expect_file"] in message
    assert not (out / "manifest.json").exists()


def test_valid_bank_manifest(valid_bank: Path, tmp_path: Path):
    root = valid_bank.parent
    dvc = tmp_path / "data.dvc"
    dvc.write_text("outs:\n- md5: 0123456789abcdef.dir\n  path: data\n")
    out = tmp_path / "out"
    returned = run_validate(bank_config(valid_bank), out, dvc)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == returned
    assert manifest["data_dvc_md5"] == "0123456789abcdef.dir"
    assert manifest["bank"]["manifest_sha256"] == file_sha256(valid_bank)
    assert [e["id"] for e in manifest["effects"]] == list(EFFECTS)
    assert all(e["pairs"] == PAIRS for e in manifest["effects"])
    blur = manifest["effects"][1]["teacher"]
    assert blur["ranks"] == [2, 4] and blur["alphas"] == [8.0] and blur["modules"] == 6
    assert blur["targets"] == [
        "transformer_blocks.*.attn.to_out.0",
        "transformer_blocks.*.attn.to_q",
        "transformer_blocks.*.img_mlp.net.*.proj",
    ]
    assert manifest["general"] == {"sources": 3, "instructions": 2}
    assert manifest["eval"] == {"sources": 2}
    base = manifest["base"]
    assert base["model_index_sha256"] == file_sha256(root / "base" / "model_index.json")
    files = manifest["files"]
    for relpath, digest in files.items():
        assert file_sha256(root / relpath) == digest
    assert "effects/sepia/pairs/0002_result.png" in files
    assert "base/transformer/diffusion_pytorch_model.safetensors" in files
    assert "bank.yaml" in files and "general/instructions.txt" in files
    assert len([f for f in files if "/pairs/" in f]) == 2 * PAIRS * len(EFFECTS)


def test_too_few_pairs(valid_bank: Path, tmp_path: Path):
    config = BankConfig(root=valid_bank.parent, manifest=valid_bank, image_size=32, min_pairs=PAIRS + 1, max_effects=None, effects=None)
    with pytest.raises(BankError, match=r"effects/sepia/pairs: 3 pairs, fewer than bank.min_pairs=4"):
        run_validate(config, tmp_path / "out", None)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bank_accessors(valid_bank: Path):
    bank = load_bank(valid_bank, 32)
    sources, results = bank.load_pairs(bank.effect("blur"))
    assert sources.shape == results.shape == (PAIRS, 3, 32, 32)
    assert bank.load_general_sources().shape == (3, 3, 32, 32)
    assert bank.load_eval_sources().shape == (2, 3, 32, 32)
    assert bank.instructions == ("Make it brighter", "Add a soft glow")
    assert bank.base_dir == valid_bank.parent / "base"
    hashes = tree_hashes(valid_bank.parent)
    assert hashes["bank.yaml"] == file_sha256(valid_bank) and list(hashes) == sorted(hashes)


def test_max_effects_keeps_the_first_effects_and_refuses_more_than_listed(valid_bank):
    listed = [e.id for e in load_bank(valid_bank, 32).effects]
    assert [e.id for e in load_bank(valid_bank, 32, max_effects=1).effects] == listed[:1]
    with pytest.raises(BankError, match=rf"effects: bank.max_effects is {len(listed) + 1} but the manifest lists {len(listed)}"):
        load_bank(valid_bank, 32, max_effects=len(listed) + 1)


def test_bank_effects_selects_a_subset_in_manifest_order_and_names_unknown_ids(valid_bank: Path) -> None:
    listed = [e.id for e in load_bank(valid_bank, 32).effects]
    assert [e.id for e in load_bank(valid_bank, 32, effect_ids=list(reversed(listed[:2]))).effects] == listed[:2]
    with pytest.raises(BankError, match=r"effects: bank\.effects names no_such_effect, not in the manifest"):
        load_bank(valid_bank, 32, effect_ids=[listed[0], "no_such_effect"])
