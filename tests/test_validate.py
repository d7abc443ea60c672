"""The validate stage: every bad-bank case fails with one clear line and no manifest; a good bank is recorded."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from bankfactory import EFFECTS, PAIRS, TEACHER, apply_mutation

from collectionlora.bank import RESERVED_IDS, file_sha256, is_reserved, load_bank, tree_hashes
from collectionlora.config import BankConfig, load_params
from collectionlora.errors import BankError
from collectionlora.validate import run_validate

REPO = Path(__file__).resolve().parents[1]
CASES = sorted((Path(__file__).parent / "fixtures" / "bad_banks").glob("*.yaml"))
MIN_TEACHER_DELTA = load_params(REPO / "params.yaml").bank.min_teacher_delta  # the shipped threshold


def bank_config(manifest: Path) -> BankConfig:
    return BankConfig(
        root=manifest.parent, manifest=manifest, image_size=32, min_pairs=1, min_teacher_delta=MIN_TEACHER_DELTA,
        max_effects=None, effects=None,
    )


def test_corpus_is_large_enough():
    assert len(CASES) >= 111


@pytest.mark.timeout(60)  # a FIFO or /dev/zero opened for reading would hang: fail instead
@pytest.mark.parametrize("case_file", CASES, ids=[c.stem for c in CASES])
def test_bad_bank_is_refused(case_file: Path, valid_bank: Path, tmp_path: Path):
    case = yaml.safe_load(case_file.read_text(encoding="utf-8"))
    assert case["name"] == case_file.stem
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"stale": true}')  # a stale success must not survive
    apply_mutation(valid_bank.parent, case["mutation"])
    with warnings.catch_warnings(record=True) as warned, pytest.raises(BankError) as caught:
        warnings.simplefilter("always")
        run_validate(bank_config(valid_bank), out, None)
    assert not [str(w.message) for w in warned]  # e.g. Pillow's DecompressionBombWarning: refused, not warned
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
    config = BankConfig(root=valid_bank.parent, manifest=valid_bank, image_size=32, min_pairs=PAIRS + 1, min_teacher_delta=1e-3, max_effects=None, effects=None)
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


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_teachers_in_other_layouts_still_pass(valid_bank: Path, tmp_path: Path, layout: str):
    """The new checks (patterns of adapter_config.json, integer kohya alphas, deltas) accept real layouts."""
    from collectionlora.lorafile import base_linear_shapes_from_safetensors, read_lora, write_lora

    root = valid_bank.parent
    shapes = base_linear_shapes_from_safetensors(root / "base" / "transformer")
    for effect_id in EFFECTS:
        path = root / TEACHER.format(id=effect_id)
        write_lora(read_lora(path, shapes), path, layout)
    if layout == "peft":  # blur mixes ranks 4 and 2: its adapter_config.json holds escaped-path rank patterns
        assert json.loads((root / "effects/blur/teacher/adapter_config.json").read_text())["rank_pattern"]
    manifest = run_validate(bank_config(valid_bank), tmp_path / "out", None)
    assert [e["teacher"]["layout"] for e in manifest["effects"]] == [layout] * len(EFFECTS)
    assert all(e["teacher"]["delta"] > 100 * MIN_TEACHER_DELTA for e in manifest["effects"])


def test_reserved_ids_cover_the_names_the_code_uses():
    """One tuple in bank.py; every adapter name, judge label and stream name of the code is in it."""
    from collectionlora import adapters, edit, teachers
    from collectionlora.distill import routing, trainer
    from collectionlora.evaluate import baselines, judge

    names = [adapters.NONE, judge.NONE, routing.EFFECT, routing.GENERAL, trainer.STUDENT, trainer.CRITIC, edit.STUDENT,
             edit.TEACHER, edit.ACCELERATION, edit.COLLECTION_ADAPTER, teachers.TRAINING_ADAPTER, baselines.FM_ALL_IN_ONE,
             baselines._TRAINING, "teacher_slot_0", "teacher_slot_12", "merge_ties", "other", "cascade", "fused"]
    assert [name for name in names if not is_reserved(name)] == []
    assert len(set(RESERVED_IDS)) == len(RESERVED_IDS)
    assert not is_reserved("sepia") and not is_reserved("teacher_slot") and not is_reserved("nonea")


@pytest.mark.parametrize("case", ["image_header_in_bomb_warning_range", "fifo_in_base"])
def test_cli_refuses_with_one_line_and_writes_nothing(case: str, valid_bank: Path, tmp_path: Path):
    """The real command: exit 1, exactly one `error:` line on stderr (no warning before it), no output folder."""
    spec = yaml.safe_load((Path(__file__).parent / "fixtures" / "bad_banks" / f"{case}.yaml").read_text(encoding="utf-8"))
    apply_mutation(valid_bank.parent, spec["mutation"])
    out = tmp_path / "out"
    script = Path(sys.executable).with_name("collectionlora")  # the installed console script
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "collectionlora.cli"]
    result = subprocess.run(
        [*command, "validate", "--set", f"bank.root={valid_bank.parent}", "--set", f"bank.manifest={valid_bank}", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert spec["expect_error_substring"] in lines[0] and spec["expect_file"] in lines[0]
    assert result.stdout == ""
    assert not out.exists()


def test_relative_delta_is_the_norm_of_the_full_weight_delta(valid_bank: Path):
    """The r x r Gram shortcut equals ||sum (alpha/r) B@A|| / ||W|| computed from the full out x in matrices."""
    from safetensors.torch import load_file

    from collectionlora.loradelta import base_norms_squared, relative_delta
    from collectionlora.lorafile import base_linear_shapes_from_safetensors, read_lora

    root = valid_bank.parent
    transformer = root / "base" / "transformer"
    blur = read_lora(root / TEACHER.format(id="blur"), base_linear_shapes_from_safetensors(transformer))
    base = load_file(transformer / "diffusion_pytorch_model.safetensors")
    delta = sum(float((blur.modules[n].scale * b.double() @ a.double()).square().sum()) for n, a, b in blur.pairs())
    weights = sum(float(base[f"{n}.weight"].double().square().sum()) for n in blur.modules)
    expected = (delta / weights) ** 0.5
    assert relative_delta(blur, base_norms_squared(transformer, set(blur.modules))) == pytest.approx(expected, rel=1e-9)
    assert relative_delta(blur, None) == pytest.approx(delta**0.5, rel=1e-9)
    assert expected > 100 * MIN_TEACHER_DELTA
