"""The evaluate stage on a tiny real bank: the acceleration LoRA, the baselines, every method scored and
reported, the gate's decisions, and bad input refused before anything is written."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_WORKFLOW_MANIFEST, params_for_bank
from fake_chat import FakeChatEndpoint, serving
from PIL import Image
from tiny_vision import tiny_clip, tiny_dinov2
from typer.testing import CliRunner

from collectionlora.cli import app
from collectionlora.config import GateConfig
from collectionlora.distill.export import LORA_WEIGHTS
from collectionlora.errors import CollectionLoraError, ConfigError
from collectionlora.evaluate.gate import decide_gate
from collectionlora.evaluate.report import (
    BLEEDING,
    COST,
    GATE,
    METRICS,
    PER_EFFECT,
    SAMPLES,
    TABLE,
)
from collectionlora.images import grid, labelled_grid, quantize
from collectionlora.lorafile import read_lora
from collectionlora.stages import (
    run_evaluate,
    run_validate,
)

MANIFEST = TINY_WORKFLOW_MANIFEST


@pytest.fixture(scope="module")
def setup(tiny_workflow: dict) -> dict:
    """The session's tiny workflow: a private bank copy with rollouts, a tiny student and its baselines."""
    return tiny_workflow


@pytest.fixture(scope="module")
def evaluated(tiny_workflow: dict) -> tuple[dict, Path]:
    return tiny_workflow["metrics"], tiny_workflow["eval"]


def test_the_demo_bank_ships_an_acceleration_lora_that_validate_checks(setup):
    root, params = setup["root"], setup["params"]
    manifest = yaml.safe_load((root / MANIFEST).read_text())
    path = root / manifest["acceleration"]
    lora = read_lora(path, None)
    assert set(lora.ranks().values()) == {params.distill.rank}
    report = run_validate(params.bank, setup["work"] / "bank", None)
    assert report["acceleration"]["path"] == manifest["acceleration"]
    assert manifest["acceleration"] in report["files"]


def test_baselines_are_an_fm_lora_and_one_merge_per_method(setup):
    report, folder, params = setup["baselines_report"], setup["work"] / "baselines", setup["params"]
    fm = read_lora(folder / report["fm_all_in_one"]["file"], None)
    assert set(fm.ranks().values()) == {params.baselines.fm_all_in_one.rank}
    rollout_rows = sum(len((setup["work"] / "rollouts" / e / "index.jsonl").read_text().splitlines()) for e in report["effects"])
    assert report["fm_all_in_one"]["rows"] == rollout_rows
    assert list(report["merges"]) == params.baselines.merges.methods
    for method, entry in report["merges"].items():
        assert (folder / entry["file"]).is_file(), method
    assert json.loads((folder / "baselines.json").read_text()) == report
    assert not (folder.parent / "baselines.partial").exists()


def test_every_method_is_scored_and_every_output_written(evaluated, setup):
    summary, out = evaluated
    params = setup["params"]
    expected = ["teacher", "cascade", "fm_all_in_one"] + [f"merge_{m}" for m in params.baselines.merges.methods]
    expected += [f"student_{k}nfe" for k in params.evaluate.student_steps] + [f"fused_{d}" for d in params.evaluate.fused_dtypes]
    assert list(summary["methods"]) == expected
    for name in (METRICS, PER_EFFECT, TABLE, COST, GATE, BLEEDING, SAMPLES):
        assert (out / name).is_file(), name
    assert json.loads((out / METRICS).read_text()) == summary
    effects = summary["effects"]
    rows = list(csv.DictReader((out / PER_EFFECT).open()))
    assert [(r["method"], r["effect"]) for r in rows] == [(m, e) for m in expected for e in effects]
    for name, row in summary["methods"].items():
        assert 0 <= row["judge_accuracy"] <= 1 and 0 <= row["bcr"] <= 1 and 0 <= row["bleed_rate"] <= 1, name
    assert summary["cases"] == 2 * 2 + 2 * 2  # 2 sources; 2 deterministic effects x 1 seed, 1 stochastic x 2
    table = (out / TABLE).read_text()
    assert "| Teachers, 8 NFE (Base) | 8 |" in table and "## Gate (student_8nfe): " in table
    with Image.open(out / SAMPLES) as image:  # per effect a row of source | teacher | cascade | student (x3 enlarged)
        width, height = 4 * 96 + 5 * 2, len(effects) * (96 + 2) + 2
        assert image.width > width and image.height > height  # and a margin for labels on the left and on top
        left, top = image.width - width, image.height - height
        gray = image.convert("L")
        assert gray.crop((0, top, left, image.height)).getextrema()[0] < 100  # the effects' names
        assert gray.crop((left, 0, image.width, top)).getextrema()[0] < 100  # the methods' names


def test_samples_png_names_the_effect_of_each_row_and_the_method_of_each_column():
    tiles = [[torch.full((3, 8, 8), value) for value in (0.2, 0.5, 0.8)] for _ in range(2)]
    plain = grid(tiles, scale=3)
    labelled = labelled_grid(tiles, ["grayscale", "snow"], ["source", "teacher", "student_8nfe"], scale=3)
    top, left = labelled.shape[1] - plain.shape[1], labelled.shape[2] - plain.shape[2]
    assert top > 0 and left > 0 and torch.equal(labelled[:, top:, left:], quantize(plain))  # the tiles untouched
    other_row = labelled_grid(tiles, ["grayscale", "glow"], ["source", "teacher", "student_8nfe"], scale=3)
    other_column = labelled_grid(tiles, ["grayscale", "snow"], ["source", "teacher", "cascade"], scale=3)
    assert other_row.shape == other_column.shape == labelled.shape
    changed_rows = (other_row != labelled).any(0).any(1).nonzero().flatten()
    assert changed_rows.min() >= top + 2 + 24 + 2  # only the second row's label differs
    changed_columns = (other_column != labelled).any(0).any(0).nonzero().flatten()
    assert changed_columns.min() >= left + 2 + 2 * (24 + 2) and (other_column != labelled)[:, top:].sum() == 0


def test_metrics_compare_with_the_teacher_and_the_ground_truth(evaluated):
    summary, out = evaluated
    rows = {(r["method"], r["effect"]): r for r in csv.DictReader((out / PER_EFFECT).open())}
    effects = summary["effects"]
    stochastic = effects[-1]
    for effect in effects[:-1]:
        assert rows[("teacher", effect)]["psnr_truth_db"] and not rows[("teacher", effect)]["psnr_teacher_db"]
        assert rows[("cascade", effect)]["psnr_teacher_db"] and not rows[("cascade", effect)]["fd_teacher"]
    assert rows[("cascade", stochastic)]["fd_teacher"] and rows[("teacher", stochastic)]["diversity"]
    assert not rows[("teacher", stochastic)]["psnr_truth_db"]


def test_cost_counts_adapter_traffic_per_request_and_storage(evaluated, setup):
    summary, _ = evaluated
    methods = summary["methods"]
    requests = setup["params"].evaluate.cost_requests
    assert methods["teacher"]["adapter_loads_per_request"] > 1 / requests  # a new effect, a new load
    assert methods["student_1nfe"]["adapter_loads_per_request"] == 1 / requests  # loaded once, from a cold start
    assert methods["fused_float32"]["adapter_switches_per_request"] == 0
    assert methods["student_1nfe"]["stored_bytes"] == (setup["work"] / "student" / LORA_WEIGHTS).stat().st_size
    assert methods["student_1nfe"]["nfe"] == 1 and methods["teacher"]["nfe"] == 8
    assert methods["fused_float32"]["fused_delta_kept"] == pytest.approx(1.0, abs=1e-3)
    assert 0 <= methods["fused_bfloat16"]["fused_delta_kept"] <= 1.5
    assert methods["fused_bfloat16"]["stored_bytes"] * 2 == methods["fused_float32"]["stored_bytes"]


def test_gate_json_holds_each_check_with_its_values(evaluated, setup):
    summary, out = evaluated
    gate = json.loads((out / GATE).read_text())
    names = [c["name"] for c in gate["checks"]]
    assert names == ["bcr_below_cascade", "bcr_below_fm_all_in_one", "bcr_near_teacher", "accuracy_near_teacher", "effect_floor"]
    assert gate["passed"] == all(c["passed"] for c in gate["checks"]) == summary["gate"]["passed"]


# ---- the gate on constructed summaries ----------------------------------------------------------------------
GATE_CONFIG = GateConfig(student="s", teacher="t", beat_bcr_of=["c"], bcr_margin=0.02, accuracy_tolerance=0.02, effect_floor=0.5)


def _decide(student: dict, per_effect: dict[str, float] | None = None):
    summaries = {"s": student, "t": {"bcr": 0.10, "judge_accuracy": 0.90}, "c": {"bcr": 0.20, "judge_accuracy": 0.80}}
    per_effect = per_effect or {"a": 0.9, "b": 0.8}
    return decide_gate(summaries, {e: {"judge_accuracy": v} for e, v in per_effect.items()}, GATE_CONFIG)


def test_gate_passes_a_student_that_matches_the_teachers_and_beats_the_cascade():
    decision = _decide({"bcr": 0.11, "judge_accuracy": 0.885})
    assert decision.passed and decision.reasons == []


@pytest.mark.parametrize(
    ("student", "per_effect", "failed"),
    [
        ({"bcr": 0.20, "judge_accuracy": 0.95}, None, ["bcr_below_c", "bcr_near_teacher"]),  # ties the cascade: not below
        ({"bcr": 0.125, "judge_accuracy": 0.95}, None, ["bcr_near_teacher"]),
        ({"bcr": 0.05, "judge_accuracy": 0.87}, None, ["accuracy_near_teacher"]),
        ({"bcr": 0.05, "judge_accuracy": 0.95}, {"a": 1.0, "b": 0.49}, ["effect_floor"]),
    ],
)
def test_gate_fails_with_the_reason_of_each_broken_check(student, per_effect, failed):
    decision = _decide(student, per_effect)
    assert not decision.passed
    assert [c.name for c in decision.checks if not c.passed] == failed
    assert all(reason.startswith("FAILED: ") for reason in decision.reasons)
    if failed == ["effect_floor"]:
        assert "(b)" in decision.reasons[0]


# ---- bad input: one line, nothing written -------------------------------------------------------------------
def test_two_worker_processes_score_every_method_as_one_process_does(evaluated, setup, tmp_path):
    """evaluate.processes: each worker edits whole effects with the same per-row seeds (one thread each,
    as the suite's single process), so every score is the one-process evaluation's."""
    summary, _ = evaluated
    params = params_for_bank(setup["params"], setup["root"], MANIFEST, evaluate={"processes": 2})
    parallel = run_evaluate(params, setup["work"] / "student", setup["work"] / "baselines", tmp_path / "eval")

    def scores(metrics: dict) -> dict:
        return {name: {k: v for k, v in row.items() if "seconds" not in k} for name, row in metrics["methods"].items()}

    assert list(parallel["methods"]) == list(summary["methods"])
    assert scores(parallel) == scores(summary)
    assert all(row["seconds_per_edit_batched"] > 0 for row in parallel["methods"].values())
    assert (tmp_path / "eval" / SAMPLES).read_bytes() == (setup["eval"] / SAMPLES).read_bytes()


def test_a_gate_naming_an_unevaluated_method_fails_before_anything_runs(setup, tmp_path):
    params = params_for_bank(setup["params"], setup["root"], MANIFEST, evaluate={"methods": ["teacher", "student"]})
    with pytest.raises(ConfigError, match=r"evaluate\.gate\.beat_bcr_of: \['cascade', 'fm_all_in_one'\] not among"):
        run_evaluate(params, setup["work"] / "student", setup["work"] / "baselines", tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_a_bank_without_acceleration_cannot_run_the_cascade(setup, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(setup["root"], root)
    manifest = yaml.safe_load((root / MANIFEST).read_text())
    del manifest["acceleration"]
    (root / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False))
    params = params_for_bank(setup["params"], root, MANIFEST)
    with pytest.raises(CollectionLoraError, match=r"bank-3\.yaml: acceleration: the bank has no acceleration LoRA"):
        run_evaluate(params, setup["work"] / "student", setup["work"] / "baselines", tmp_path / "eval")
    assert not (tmp_path / "eval").exists() and not (tmp_path / "eval.partial").exists()


def test_the_cli_prints_the_methods_table_and_a_missing_baseline_is_one_line(setup, tmp_path):
    params_file = tmp_path / "params.yaml"
    raw = setup["params"].model_dump(mode="json")
    raw["evaluate"]["methods"] = ["teacher", "cascade", "student"]
    raw["evaluate"]["gate"]["beat_bcr_of"] = ["cascade"]
    raw["evaluate"]["student_steps"] = [8]
    params_file.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    args = ["evaluate", "--params", str(params_file), "--collection", str(setup["work"] / "student"), "--out", str(tmp_path / "eval")]
    result = runner.invoke(app, [*args, "--baselines", str(tmp_path / "none")])
    assert result.exit_code == 0, result.output
    assert "| Student, 8 NFE (ours) | 8 |" in result.output and "## Gate (student_8nfe)" in result.output
    raw["evaluate"]["methods"] = ["teacher", "cascade", "student", "fm_all_in_one"]
    params_file.write_text(yaml.safe_dump(raw))
    bad = runner.invoke(app, [*args, "--baselines", str(tmp_path / "none"), "--out", str(tmp_path / "eval2")])
    assert bad.exit_code == 1 and "run `collectionlora baselines` first" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and not (tmp_path / "eval2").exists()


# ---- real-model metrics behind the same interface ----------------------------------------------------------
class AlwaysGood(FakeChatEndpoint):
    """An MLLM that finds no bad case and scores every subject 4."""

    def reply(self, auth: str) -> tuple[int, str]:
        prompt = self.requests[-1]["json"]["messages"][0]["content"][0]["text"]
        answer = '{"brief_reasoning": "fine", "is_bad_case": false}' if "is_bad_case" in prompt else '{"brief_reasoning": "same", "scores": 4}'
        return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]})


def test_enabled_plugins_add_clip_dino_and_mllm_columns(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("COLLECTIONLORA_MLLM_API_KEY", "test-key-not-secret")
    with serving(AlwaysGood(), monkeypatch) as fake:
        plugins = {
            "clip": {"enabled": True, "path": str(tiny_clip(tmp_path / "clip"))},
            "dino": {"enabled": True, "path": str(tiny_dinov2(tmp_path / "dino"))},
            "mllm": {"enabled": True, "url": fake.url, "model": "fake-vl"},
        }
        methods = {"methods": ["teacher", "student"], "student_steps": [8], "gate": {"beat_bcr_of": []}}
        params = params_for_bank(setup["params"], setup["root"], MANIFEST, eval_plugins=plugins, evaluate=methods)
        summary = run_evaluate(params, setup["work"] / "student", None, tmp_path / "eval")
    teacher, student = summary["methods"]["teacher"], summary["methods"]["student_8nfe"]
    assert summary["plugins"] == ["clip", "dino", "judge"]
    assert "clip_teacher" not in teacher and -1 <= student["clip_teacher"] <= 1  # CLIP compares with the teacher's edit
    assert -1 <= teacher["dino_source"] <= 1 and -1 <= student["dino_source"] <= 1
    assert teacher["mllm_bcr"] == student["mllm_bcr"] == 0.0 and teacher["mllm_vsa"] == student["mllm_vsa"] == 4.0
    assert len(fake.requests) == 2 * 2 * summary["cases"]  # BCR + VSA per case, for both methods
    assert all(r["auth"] == "Bearer test-key-not-secret" for r in fake.requests)
    table = (tmp_path / "eval" / TABLE).read_text()
    assert "| CLIP ↑ | DINO ↑ | MLLM BCR ↓ | VSA ↑ |" in table and "test-key-not-secret" not in table


def test_the_bleeding_plot_puts_the_requested_effects_on_its_diagonal():
    from collectionlora.evaluate.metrics import bleeding_matrix
    from collectionlora.evaluate.report import condensed_rates

    labels = ["none", "x", "b", "y", "a"]  # judge order differs from the bank's, with labels the bank lacks
    matrix = bleeding_matrix(["a", "a", "a", "a", "b", "b"], ["a", "a", "b", "y", "none", "b"], labels)
    columns, rates = condensed_rates(matrix)
    assert list(matrix.effects) == ["b", "a"] and columns == ["b", "a", "none", "other"]
    assert rates.tolist() == [[0.5, 0.0, 0.5, 0.0], [0.25, 0.5, 0.0, 0.25]]
