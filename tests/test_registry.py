"""The MLflow registry end: gated registration of the tiny workflow's students, lineage, the pyfunc
model (models-from-code, no pickle) edited by alias as `collectionlora edit` does, idempotence,
promotion, and bad input refused with one line and nothing registered."""

from __future__ import annotations

import base64
import getpass
import io
import json
import shutil
import socket
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from conftest import TINY_MODEL_NAME
from PIL import Image
from typer.testing import CliRunner

from collectionlora.bank import file_sha256
from collectionlora.cli import app
from collectionlora.config import Params
from collectionlora.distill.export import LORA_WEIGHTS
from collectionlora.errors import CollectionLoraError
from collectionlora.registry.promotion import Score, decide_champion
from collectionlora.registry.register import promote
from collectionlora.stages import run_register

LINEAGE = (
    "lora_sha256", "git_commit", "data_dvc_md5", "bank_manifest_sha256", "params_sha256", "rollout_index_sha256", "distill_run_id",
    "kfp_run_id", "base", "gate_passed", "gate_judge_accuracy", "gate_bcr", "gate_summary",
)


# ---- the champion rule ----------------------------------------------------------------------------
PASS, FAIL = True, False


@pytest.mark.parametrize(
    ("candidate", "champion", "moves", "says"),
    [
        (Score(PASS, 0.90, 0.10), None, True, "first to pass the gate"),
        (Score(FAIL, 0.99, 0.01), None, False, "gate failed"),
        (Score(FAIL, 0.99, 0.01), Score(PASS, 0.50, 0.50), False, "gate failed"),
        (Score(PASS, 0.80, 0.05), Score(PASS, 0.90, 0.20), False, "does not beat it"),
        (Score(PASS, 0.95, 0.30), Score(PASS, 0.90, 0.10), True, "from version 1"),
        (Score(PASS, 0.90, 0.09), Score(PASS, 0.90, 0.10), True, "from version 1"),  # accuracy tie: lower BCR wins
        (Score(PASS, 0.90, 0.10), Score(PASS, 0.90, 0.10), False, "does not beat it"),  # full tie: the champion stays
        (Score(PASS, 0.50, 0.50), Score(FAIL, 0.90, 0.10), True, "from version 1"),  # a champion forced in despite its gate
    ],
)
def test_champion_moves_only_to_a_passing_version_that_beats_it(candidate, champion, moves, says):
    decision = decide_champion("2", candidate, "1" if champion else None, champion)
    assert decision.move is moves
    assert says in decision.reason and "\n" not in decision.reason


# ---- registration of the tiny workflow ---------------------------------------------------------
def test_a_passing_first_version_becomes_champion_and_a_failing_one_only_challenger(registered_store):
    first, second = registered_store["registrations"]
    assert (first["version"], first["registered"], first["champion_moved"], first["champion"]) == ("1", True, True, "1")
    assert first["aliases"] == ["challenger", "champion"]
    assert (second["version"], second["registered"], second["champion_moved"], second["champion"]) == ("2", True, False, "1")
    assert second["aliases"] == ["challenger"] and "gate failed" in second["reason"]
    written = json.loads((registered_store["work"] / "reg-2" / "registration.json").read_text())
    assert written == second


def test_versions_carry_lineage_the_model_card_and_link_the_distillation_run(tiny_registry):
    client = _client(tiny_registry)
    version = client.get_model_version(TINY_MODEL_NAME, "1")
    assert set(LINEAGE) <= set(version.tags)
    student = tiny_registry["students"][0]
    record = json.loads((student / "collection.json").read_text())
    assert version.tags["lora_sha256"] == file_sha256(student / LORA_WEIGHTS)
    assert version.tags["bank_manifest_sha256"] == file_sha256(tiny_registry["manifest"])
    assert version.tags["distill_run_id"] == record["tracking_run_id"]
    assert client.get_run(record["tracking_run_id"]).info.run_name.startswith("distill-")
    assert version.tags["gate_passed"] == "true" and version.tags["gate_summary"].endswith("checks passed")
    assert client.get_model_version(TINY_MODEL_NAME, "2").tags["gate_passed"] == "false"
    assert "FAILED" in client.get_model_version(TINY_MODEL_NAME, "2").tags["gate_summary"]
    for effect in record["prompts"]["effects"]:
        assert f"`{effect['effect']}`" in version.description and f"`{effect['trigger']}`" in version.description
    assert "load_lora_weights" in version.description and "mlflow.pyfunc.load_model" in version.description
    assert "FlowMatchEulerDiscreteScheduler.from_pretrained" in version.description  # the card's stock call


def test_the_registration_run_holds_the_evaluation(tiny_registry):
    client = _client(tiny_registry)
    version = client.get_model_version(TINY_MODEL_NAME, "1")
    run = client.get_run(version.run_id)
    assert run.data.params["registry.model_name"] == TINY_MODEL_NAME
    evaluation = json.loads((tiny_registry["evaluations"][0] / "metrics.json").read_text())
    assert run.data.metrics["student_8nfe.judge_accuracy"] == pytest.approx(evaluation["methods"]["student_8nfe"]["judge_accuracy"])
    assert run.data.tags["distill_run_id"] == version.tags["distill_run_id"]
    logged = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"metrics.json", "gate.json", "per_effect.csv", "methods.md", "bleeding.png", "samples.png", "per_effect.json"} <= logged


def test_the_logged_model_is_code_and_safetensors_with_no_pickle(tiny_registry):
    _client(tiny_registry)
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{TINY_MODEL_NAME}/1"))
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib"))], files
    assert "artifacts/pytorch_lora_weights.safetensors" in files and "artifacts/collection.json" in files
    assert "artifacts/scheduler/scheduler_config.json" in files  # the stock diffusers call's scheduler
    assert any(f.startswith("artifacts/base/transformer/") and f.endswith(".safetensors") for f in files)  # the embedded base ships inside
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "pyfunc_model.py" in files  # models-from-code


def test_the_pyfunc_edits_by_alias_exactly_as_the_edit_command(tiny_registry, tmp_path):
    _client(tiny_registry)
    model = mlflow.pyfunc.load_model(f"models:/{TINY_MODEL_NAME}@champion")
    out = model.predict(tiny_registry["predict_input"])
    edited = _pixels(base64.b64decode(out["image"][0]))
    params_file = _params_file(tiny_registry["params"], tmp_path)
    args = ["edit", "--params", str(params_file), "--collection", str(tiny_registry["students"][0]), "--effect", tiny_registry["effect"],
            "--image", str(tiny_registry["image"]), "--out", str(tmp_path / "edit.png"), "--steps", "8", "--seed", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert np.array_equal(edited, _pixels((tmp_path / "edit.png").read_bytes()))
    source = _pixels(tiny_registry["image"].read_bytes())
    assert edited.shape == source.shape and not np.array_equal(edited, source)


def test_a_request_with_an_unknown_effect_is_one_line(tiny_registry):
    _client(tiny_registry)
    model = mlflow.pyfunc.load_model(f"models:/{TINY_MODEL_NAME}/1")
    request = tiny_registry["predict_input"].assign(effect="no-such-effect")
    with pytest.raises(CollectionLoraError, match="request row 0: effect: unknown effect 'no-such-effect'"):
        model.predict(request)


def test_registering_the_same_lora_again_reports_the_existing_version(tiny_registry, tmp_path):
    client = _client(tiny_registry)
    again = run_register(tiny_registry["params"], tiny_registry["students"][0], tiny_registry["evaluations"][0], tiny_registry["manifest"], tmp_path)
    assert (again["registered"], again["version"]) == (False, "1") and "already" in again["reason"]
    assert len(client.search_model_versions(f"name='{TINY_MODEL_NAME}'")) == 2


# ---- promotion by hand -------------------------------------------------------------------------
def test_promote_applies_the_champion_rule_and_force_records_who_and_why(tiny_registry, monkeypatch):
    client = _client(tiny_registry)
    params = tiny_registry["params"]
    with pytest.raises(CollectionLoraError, match="version 2's gate failed.*--force"):
        promote(params, TINY_MODEL_NAME, "2")
    with pytest.raises(CollectionLoraError, match="--force needs --reason"):
        promote(params, TINY_MODEL_NAME, "2", force=True)
    line = promote(params, TINY_MODEL_NAME, "2", force=True, reason="hotfix for the demo")
    assert "forced by" in line
    assert str(client.get_model_version_by_alias(TINY_MODEL_NAME, "champion").version) == "2"
    tags = client.get_model_version(TINY_MODEL_NAME, "2").tags
    assert (tags["forced_champion_by"], tags["forced_champion_reason"]) == (getpass.getuser(), "hotfix for the demo")
    assert "from version 2" in promote(params, TINY_MODEL_NAME, "1")  # back by the rule: 1 passed, 2 failed
    with pytest.raises(CollectionLoraError, match="no version 9"):
        promote(params, TINY_MODEL_NAME, "9")


def test_the_cli_registers_promotes_and_shows(tiny_registry, tmp_path):
    params_file = _params_file(tiny_registry["params"], tmp_path)
    runner = CliRunner()
    shown = runner.invoke(app, ["registry", "show", "--params", str(params_file)])
    assert shown.exit_code == 0, shown.output
    assert "version 2 @challenger: gate failed" in shown.output and "version 1 @champion: gate passed" in shown.output
    refused = runner.invoke(app, ["promote", "--params", str(params_file), "--name", TINY_MODEL_NAME, "--version", "2"])
    assert refused.exit_code == 1 and refused.output.count("\n") == 1 and refused.output.startswith("error: promote:")
    staging = runner.invoke(app, ["promote", "--params", str(params_file), "--name", TINY_MODEL_NAME, "--version", "2", "--alias", "staging"])
    assert staging.exit_code == 0 and "staging -> version 2" in staging.output


# ---- bad input: one line, non-zero exit, nothing registered ---------------------------------------
def _copy_evaluation(tiny_registry, tmp_path: Path, index: int = 0) -> Path:
    folder = tmp_path / "eval"
    shutil.copytree(tiny_registry["evaluations"][index], folder)
    return folder


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing_gate", r"gate\.json: missing \(run `collectionlora evaluate` first\)"),
        ("corrupt_gate", r"gate\.json: not readable JSON"),
        ("gate_disagrees", r"gate\.json: passed: disagrees with its checks"),
        ("evaluation_of_another_lora", r"metrics\.json: student_lora_sha256: this evaluation is of another LoRA"),
        ("lora_not_the_collections", r"sha256 differs from .*collection\.json files\.pytorch_lora_weights\.safetensors"),
        ("missing_samples", r"samples\.png: missing"),
    ],
)
def test_bad_registration_input_is_one_line_and_registers_nothing(tiny_registry, tmp_path, breakage, message):
    client = _client(tiny_registry)
    student, evaluation = tiny_registry["students"][0], _copy_evaluation(tiny_registry, tmp_path)
    if breakage == "missing_gate":
        (evaluation / "gate.json").unlink()
    elif breakage == "corrupt_gate":
        (evaluation / "gate.json").write_text('{"passed": tru')
    elif breakage == "gate_disagrees":
        gate = json.loads((evaluation / "gate.json").read_text())
        (evaluation / "gate.json").write_text(json.dumps({**gate, "passed": not gate["passed"]}))
    elif breakage == "evaluation_of_another_lora":
        student = tiny_registry["students"][1]
    elif breakage == "lora_not_the_collections":
        student = tmp_path / "student"
        shutil.copytree(tiny_registry["students"][0], student)
        shutil.copy(tiny_registry["students"][1] / LORA_WEIGHTS, student / LORA_WEIGHTS)
    elif breakage == "missing_samples":
        (evaluation / "samples.png").unlink()
    params_file = _params_file(tiny_registry["params"], tmp_path)
    args = ["register", "--params", str(params_file), "--collection", str(student), "--evaluation", str(evaluation),
            "--manifest", str(tiny_registry["manifest"]), "--out", str(tmp_path / "reg")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: ") and __import__("re").search(message, result.output), result.output
    assert len(client.search_model_versions(f"name='{TINY_MODEL_NAME}'")) == 2
    assert not (tmp_path / "reg").exists()


def test_require_pass_refuses_a_failed_gate_without_registering(tiny_registry, tmp_path):
    client = _client(tiny_registry)
    student = tmp_path / "student"  # a LoRA not registered yet, so only the gate can stop it
    shutil.copytree(tiny_registry["students"][1], student)
    params_file = _params_file(tiny_registry["params"], tmp_path)
    args = ["register", "--params", str(params_file), "--collection", str(student), "--evaluation", str(tiny_registry["evaluations"][1]),
            "--manifest", str(tiny_registry["manifest"]), "--out", str(tmp_path / "reg"), "--require-pass"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "passed: false, not registered (--require-pass)" in result.output
    assert len(client.search_model_versions(f"name='{TINY_MODEL_NAME}'")) == 2


def test_an_unreachable_tracking_server_is_one_line(tiny_registry, tmp_path, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret-password@127.0.0.1:{port}")
    params_file = _params_file(tiny_registry["params"], tmp_path)
    args = ["register", "--params", str(params_file), "--collection", str(tiny_registry["students"][0]),
            "--evaluation", str(tiny_registry["evaluations"][0]), "--manifest", str(tiny_registry["manifest"]), "--out", str(tmp_path / "reg")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert f"http://127.0.0.1:{port} is unreachable" in result.output and "secret-password" not in result.output


@pytest.mark.parametrize("name", ["team/effects", "models:x", "with space", "", "a@b"])
def test_a_model_name_mlflow_refuses_is_a_params_error(tiny_registry, tmp_path, name):
    params_file = _params_file(tiny_registry["params"], tmp_path)
    result = CliRunner().invoke(app, ["registry", "show", "--params", str(params_file), "--set", f"registry.model_name={json.dumps(name)}"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "registry.model_name" in result.output, result.output


# ---- helpers -------------------------------------------------------------------------------------
def _client(tiny_registry) -> mlflow.MlflowClient:
    mlflow.set_tracking_uri(tiny_registry["tracking_uri"])
    return mlflow.MlflowClient()


def _params_file(params: Params, folder: Path) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
