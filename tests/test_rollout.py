"""The rollout stage on a tiny real bank: the content-addressed cache computes only what is missing
(new effect, changed teacher, interrupted run), batching changes nothing, and stale rollouts are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, params_for_bank
from typer.testing import CliRunner

from collectionlora.adapters import AdapterSet
from collectionlora.bank import load_bank
from collectionlora.cli import app
from collectionlora.errors import BankError, RolloutError
from collectionlora.images import load_png, quantize
from collectionlora.lorafile import LoraWeights, read_lora, write_lora
from collectionlora.models.backbone import Backbone
from collectionlora.rollout import FIELDS, INDEX, REPORT, load_rollouts
from collectionlora.sampling import sample_teacher
from collectionlora.stages import run_rollout

# The tiny demo bank has 4 pairs per effect (conftest): 2 seeds per source make 8 targets per effect,
# sampled in batches of 3, 3 and 2.
ROLLOUT = {"samples_per_source": 2, "batch_size": 3}


def _params(tiny_params, root: Path, manifest: str = "bank.yaml"):
    return params_for_bank(tiny_params, root, manifest, rollout=ROLLOUT)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def rolled(tiny_bank: Path, tiny_params, tmp_path_factory) -> tuple[Path, Path, dict]:
    """A private copy of the tiny bank and one rollout of bank.yaml (2 effects): (root, out, report)."""
    root = _copy(tiny_bank, tmp_path_factory.mktemp("rollout") / "data")
    out = root.parent / "rollouts"
    return root, out, run_rollout(_params(tiny_params, root), out, None)


def _ids(root: Path, manifest: str = "bank.yaml") -> list[str]:
    return [effect.id for effect in load_bank(root / manifest, 32).effects]


def test_first_run_computes_every_target_and_indexes_it(rolled):
    root, out, report = rolled
    first, second = _ids(root)
    assert {e: (r["computed"], r["cached"]) for e, r in report["effects"].items()} == {first: (8, 0), second: (8, 0)}
    assert (report["totals"]["computed"], report["totals"]["cached"]) == (16, 0)
    assert json.loads((out / REPORT).read_text()) == report
    lines = _lines(out / first / INDEX)
    assert len(lines) == 8 and all(set(FIELDS) <= set(line) for line in lines)
    assert lines[0]["source"] == "effects/" + first + "/pairs/0000_source.png"
    assert lines[0]["target"] == f"{first}/{lines[0]['key']}.png" and (out / lines[0]["target"]).is_file()
    assert (lines[0]["steps"], lines[0]["cfg_scale"], lines[0]["base_hash_of"]) == (4, 5.0, "files")
    assert len({line["key"] for line in lines}) == len({line["seed"] for line in lines}) == 8
    assert sorted(p.stem for p in (out / first).glob("*.png")) == sorted(line["key"] for line in lines)
    combined = (out / INDEX).read_text()
    assert combined == (out / first / INDEX).read_text() + (out / second / INDEX).read_text()


def test_second_run_through_the_cli_computes_nothing(rolled, tiny_params, tmp_path):
    root, out, _ = rolled
    again = _copy(out, tmp_path / "rollouts")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_params(tiny_params, root).model_dump(mode="json")))
    result = CliRunner().invoke(app, ["rollout", "--out", str(again), "--params", str(params_file)])
    assert result.exit_code == 0, result.output
    first, second = _ids(root)
    printed = result.output.strip().splitlines()
    assert printed[0].startswith(f"{first}: 0 computed, 8 cached")
    assert printed[2].startswith("total: 0 computed, 16 cached")
    assert json.loads((again / REPORT).read_text())["totals"]["computed"] == 0
    for name in (INDEX, f"{first}/{INDEX}", f"{second}/{INDEX}"):
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_a_new_effect_computes_only_its_targets(rolled, tiny_params, tmp_path):
    root, out, _ = rolled
    again = _copy(out, tmp_path / "rollouts")
    report = run_rollout(_params(tiny_params, root, "bank-3.yaml"), again, None)
    first, second, third = _ids(root, "bank-3.yaml")
    counts = {e: (r["computed"], r["cached"]) for e, r in report["effects"].items()}
    assert counts == {first: (0, 8), second: (0, 8), third: (8, 0)}
    assert [line["effect"] for line in _lines(again / INDEX)] == [first] * 8 + [second] * 8 + [third] * 8


def test_effects_subset_computes_only_that_effect(rolled, tiny_params, tmp_path):
    root, _, _ = rolled
    first, _, third = _ids(root, "bank-3.yaml")
    out = tmp_path / "rollouts"
    report = run_rollout(_params(tiny_params, root, "bank-3.yaml"), out, [third])
    assert list(report["effects"]) == [third] and report["totals"]["computed"] == 8
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX, REPORT, third])
    assert (out / INDEX).read_text() == (out / third / INDEX).read_text()
    bank = load_bank(root / "bank-3.yaml", 32)
    with pytest.raises(RolloutError, match=rf"{first}/index.jsonl: missing: .*rollout --effects {first}"):
        load_rollouts(out, bank, [first, third])


def test_a_changed_teacher_recomputes_its_effect_only_and_old_rollouts_are_stale(rolled, tiny_params, tmp_path):
    root = _copy(rolled[0], tmp_path / "data")
    out = _copy(rolled[1], tmp_path / "rollouts")
    first, second = _ids(root)
    bank = load_bank(root / "bank.yaml", 32)
    teacher = bank.effect(first).teacher
    old = read_lora(teacher, None)
    scaled = {name: (a.clone(), 3 * b, old.modules[name].alpha) for name, a, b in old.pairs()}
    write_lora(LoraWeights.from_tensors(scaled), teacher, "diffusers")
    old_keys = {line["key"] for line in _lines(out / first / INDEX)}

    with pytest.raises(RolloutError) as caught:
        load_rollouts(out, bank, [second, first])
    message = str(caught.value)
    assert "\n" not in message and str(out / first / INDEX) in message
    assert "teacher_sha256: stale: teacher changed since the rollout" in message and f"--effects {first}`" in message

    report = run_rollout(_params(tiny_params, root), out, None)
    assert {e: (r["computed"], r["cached"]) for e, r in report["effects"].items()} == {first: (8, 0), second: (0, 8)}
    new_keys = {line["key"] for line in _lines(out / first / INDEX)}
    assert not new_keys & old_keys
    assert {p.stem for p in (out / first).glob("*.png")} == new_keys  # the old targets were removed
    loaded = load_rollouts(out, bank, [first, second])
    assert loaded[first].targets.shape == (8, 3, 32, 32)


def test_an_interrupted_run_resumes_with_the_missing_targets_only(rolled, tiny_params, tmp_path):
    root, done, _ = rolled
    out = _copy(done, tmp_path / "rollouts")
    first, second = _ids(root)
    lost = [out / line["target"] for line in _lines(out / first / INDEX)[:3] + _lines(out / second / INDEX)[:1]]
    for path in lost:
        path.unlink()
    partial = lost[0].with_name(f".{lost[0].name}.tmp-4242")  # killed while writing this one
    partial.write_bytes((done / lost[0].relative_to(out)).read_bytes()[:40])
    (out / second / INDEX).unlink()  # killed before the second effect finished

    report = run_rollout(_params(tiny_params, root), out, None)
    assert report["totals"]["computed"] == 4 and report["totals"]["cached"] == 12
    assert not partial.exists()
    for path in lost:
        assert path.read_bytes() == (done / path.relative_to(out)).read_bytes()
    for name in (INDEX, f"{first}/{INDEX}", f"{second}/{INDEX}"):
        assert (out / name).read_bytes() == (done / name).read_bytes()


def test_targets_do_not_depend_on_the_batch(rolled, tiny_params):
    """A target sampled alone equals the one sampled in a batch of 3 (per-item noise generators)."""
    root, out, _ = rolled
    bank = load_bank(root / "bank.yaml", 32)
    effect = bank.effects[1]
    line = _lines(out / effect.id / INDEX)[4]  # the second item of the second batch
    backbone = Backbone.load(tiny_params.base, bank.base_dir)
    adapters = AdapterSet(backbone.transformer)
    adapters.add_teacher(effect.id, effect.teacher)
    adapters.activate(effect.id)
    source = load_png(root / line["source"], 32)
    alone = sample_teacher(backbone, source[None], [effect.prompt], [line["seed"]], tiny_params.sampling).images[0]
    stored = load_png(out / line["target"], 32)
    assert (quantize(alone) - stored).abs().max() <= 1 / 255 + 1e-6
    assert (quantize(alone) != stored).float().mean() < 0.01


def test_load_rollouts_returns_rows_matching_the_index_and_refuses_a_changed_source(rolled, tmp_path):
    root, out, _ = rolled
    bank = load_bank(root / "bank.yaml", 32)
    first = bank.effects[0]
    loaded = load_rollouts(out, bank, [first.id])[first.id]
    lines = _lines(out / first.id / INDEX)
    assert loaded.teacher_prompt == first.prompt and loaded.seeds == [line["seed"] for line in lines]
    assert loaded.sources.shape == loaded.targets.shape == (len(lines), 3, 32, 32)
    assert torch.equal(loaded.sources[1], load_png(root / lines[1]["source"], 32))
    assert torch.equal(loaded.targets[1], load_png(out / lines[1]["target"], 32))

    changed = _copy(root, tmp_path / "data")
    shutil.copyfile(changed / lines[-1]["source"], changed / lines[0]["source"])
    with pytest.raises(RolloutError, match=r"line 1: source_sha256: stale: source effects/.*0000_source.png changed"):
        load_rollouts(out, load_bank(changed / "bank.yaml", 32), [first.id])


def test_unknown_effect_is_one_line_and_writes_nothing(rolled, tiny_params, tmp_path):
    root, _, _ = rolled
    out = tmp_path / "rollouts"
    with pytest.raises(BankError) as caught:
        run_rollout(_params(tiny_params, root), out, ["no_such_effect"])
    assert "\n" not in str(caught.value) and str(root / "bank.yaml") in str(caught.value)
    assert "no_such_effect" in str(caught.value)
    first = _ids(root)[0]
    result = CliRunner().invoke(
        app,
        ["rollout", "--out", str(out), "--effects", f"{first},no_such_effect", "--params", str(REPO / "params.yaml"),
         "--set", f"bank.root={root}", "--set", f"bank.manifest={root / 'bank.yaml'}"],
    )
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert "no_such_effect" in result.output
    assert not out.exists()
