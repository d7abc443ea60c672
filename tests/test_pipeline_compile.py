"""The compiled Kubeflow pipeline: deterministic IR that parses, the graph the issue asks for (fan-out
over effects, the gate, GPUs and retries on distill, Secrets as env), and the params it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO, S3_CREDENTIALS
from typer.testing import CliRunner

from collectionlora.cli import app
from collectionlora.config import load_params
from collectionlora.errors import CollectionLoraError
from collectionlora.pipeline.build import compile_pipeline, read_ir
from collectionlora.pipeline.task_params import ROLLOUT_SECTIONS, params_json, task_params

CLUSTER = {"kfp": {"bank_uri": "s3://bank-bucket/banks/demo/data"}}
GPU = {
    "base": {"device": "cuda", "dtype": "bfloat16"},
    "kfp": {
        "bank_uri": "s3://bank-bucket/banks/demo/data",
        "task": {"accelerator_count": 1},
        "distill": {"accelerator_count": 8, "node_selector": {"gpu": "h100"}},
    },
}


@pytest.fixture(scope="module")
def gpu_ir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    out = compile_pipeline(load_params(REPO / "params.yaml", GPU), tmp_path_factory.mktemp("ir") / "p.yaml", REPO)
    spec, platform = yaml.safe_load_all(out.read_text())
    return out, spec, platform


def _executor(spec: dict, task: str) -> dict:
    component = spec["root"]["dag"]["tasks"][task]["componentRef"]["name"]
    executor = spec["components"][component]["executorLabel"]
    return spec["deploymentSpec"]["executors"][executor]


def test_compile_is_deterministic_and_parses(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml", CLUSTER)
    first = compile_pipeline(params, tmp_path / "a.yaml", REPO)
    second = compile_pipeline(params, tmp_path / "b.yaml", REPO)
    assert first.read_bytes() == second.read_bytes()
    spec, platform = read_ir(first)
    assert spec.pipeline_info.name == params.kfp.pipeline_name and platform is not None
    assert set(spec.root.input_definitions.parameters) == {"bank_uri", "params", "data_version", "checkpoint_root"}


def test_the_graph_fans_out_over_effects_and_gates_the_registration(gpu_ir) -> None:
    _, spec, _ = gpu_ir
    params = load_params(REPO / "params.yaml", GPU)
    root = spec["root"]["dag"]["tasks"]
    assert {"importer", "validate", "rollout-each-effect", "collect-rollouts", "distill", "baselines", "evaluate", "register-if-gate-passed"} <= set(root)
    fan_out = spec["components"]["comp-rollout-each-effect"]["dag"]["tasks"]["for-loop-1"]
    assert fan_out["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--effects"
    assert fan_out["iteratorPolicy"]["parallelismLimit"] == params.kfp.rollout_parallelism
    for name in ("effects", "bank_digest", "params"):  # the bank's content and only rollout's sections: its cache key
        assert root["rollout-each-effect"]["inputs"]["parameters"][name]["taskOutputParameter"]["producerTask"] == "validate"
    gate = spec["components"]["comp-register-if-gate-passed"]["dag"]["tasks"]["condition-1"]
    assert "gate_passed" in gate["triggerPolicy"]["condition"] and gate["triggerPolicy"]["condition"].endswith("== true")
    assert root["register-if-gate-passed"]["inputs"]["parameters"]["gate_passed"]["taskOutputParameter"]["producerTask"] == "evaluate"


def test_distill_asks_for_gpus_retries_and_its_checkpoint_volume(gpu_ir) -> None:
    _, spec, platform = gpu_ir
    distill = _executor(spec, "distill")["container"]
    accelerator = distill["resources"]["accelerator"]
    assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", "8")
    assert distill["image"] == load_params(REPO / "params.yaml").kfp.image
    assert spec["root"]["dag"]["tasks"]["distill"]["retryPolicy"]["maxRetryCount"] == 3
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-distill"]
    assert k8s["pvcMount"][0]["mountPath"] == "/var/lib/collectionlora"
    assert k8s["nodeSelector"]["labels"] == {"gpu": "h100"}
    assert k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert k8s["activeDeadlineSeconds"] == "172800"
    assert _executor(spec, "collect-rollouts")["container"]["resources"].get("accelerator") is None


def test_credentials_reach_tasks_as_secret_env_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {**S3_CREDENTIALS, "MLFLOW_TRACKING_PASSWORD": "collectionlora-test-mlflow-pw", "KFP_TOKEN": "collectionlora-test-token"}.items():
        monkeypatch.setenv(name, value)
    out = compile_pipeline(load_params(REPO / "params.yaml", CLUSTER), tmp_path / "p.yaml", REPO)
    text = out.read_text()
    for secret in ("collectionlora-test-key-id", "collectionlora-test-secret-0123456789", "collectionlora-test-mlflow-pw", "collectionlora-test-token"):
        assert secret not in text
    _, platform = yaml.safe_load_all(text)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    registering = [name for name in executors if "secretAsEnv" in executors[name]]
    assert sorted(registering) == ["exec-distill", "exec-register"]
    envs = {e["envVar"] for s in executors["exec-register"]["secretAsEnv"] for e in s["keyToEnv"]}
    assert envs == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    assert executors["exec-register"]["configMapAsEnv"][0]["configMapName"] == "collectionlora-config"


def test_the_image_comes_from_the_environment_when_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLLECTIONLORA_IMAGE", "registry.example/collectionlora:abc123")
    spec, _ = yaml.safe_load_all(compile_pipeline(load_params(REPO / "params.yaml", CLUSTER), tmp_path / "p.yaml", REPO).read_text())
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values() if "container" in e} == {
        "registry.example/collectionlora:abc123"
    }


def test_rollout_tasks_get_exactly_the_sections_dvc_gives_the_rollout_stage() -> None:
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["rollout"]
    assert set(stage["params"]) == set(ROLLOUT_SECTIONS)
    partial = task_params(params_json({k: v for k, v in load_params(REPO / "params.yaml").model_dump(mode="json").items() if k in ROLLOUT_SECTIONS}), "/bank", ROLLOUT_SECTIONS)
    assert str(partial.bank.manifest) == "/bank/bank.yaml"
    with pytest.raises(AttributeError):
        partial.distill  # noqa: B018 (a partial Params has no defaults for what it was not given)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "kfp.bank_uri is null"),
        ({"kfp": {"bank_uri": "s3://b/d", "distill": {"accelerator_count": 2}}}, "kfp.distill.accelerator_count is 2 but base.device is cpu"),
        ({"kfp": {"bank_uri": "s3://b/d"}, "base": {"device": "cuda"}}, "base.device is cuda but kfp.task.accelerator_count is 0"),
        ({"kfp": {"bank_uri": "s3://b/d"}, "bank": {"manifest": "elsewhere/bank.yaml"}}, "bank.manifest: elsewhere/bank.yaml is outside bank.root"),
    ],
)
def test_params_the_pipeline_cannot_express_are_one_line_errors(overrides: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(CollectionLoraError, match=message.replace(".", r"\.")) as error:
        compile_pipeline(load_params(REPO / "params.yaml", overrides), tmp_path / "p.yaml", REPO)
    assert "\n" not in str(error.value) and not (tmp_path / "p.yaml").exists()


def test_task_params_refuses_bad_json_with_one_line() -> None:
    with pytest.raises(CollectionLoraError, match="not JSON"):
        task_params("{not json", "/bank")
    with pytest.raises(CollectionLoraError, match="the pipeline parameter 'params': distill"):
        task_params(params_json({**load_params(REPO / "params.yaml").model_dump(mode="json"), "distill": {"lr": "fast"}}), "/bank")


def test_cli_compile_writes_the_ir(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(tmp_path / "p.yaml"), "--repo", str(REPO), "--params", str(REPO / "params.yaml"), "--set", "kfp.bank_uri=s3://b/d"])
    assert result.exit_code == 0, result.output
    read_ir(tmp_path / "p.yaml")
    refused = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(tmp_path / "q.yaml"), "--repo", str(REPO), "--params", str(REPO / "params.yaml")])
    assert refused.exit_code == 1 and "kfp.bank_uri is null" in refused.output and not (tmp_path / "q.yaml").exists()


def test_a_broken_ir_is_refused_with_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("pipelineInfo: {name: x}\nroot: {dag: {tasks: {a: {notAField: 1}}}}\n")
    with pytest.raises(CollectionLoraError, match="not a valid KFP pipeline IR") as error:
        read_ir(broken)
    assert "\n" not in str(error.value)


def test_unknown_effect_ids_fail_before_the_pipeline_runs(valid_bank: Path, tmp_path: Path) -> None:
    from collectionlora.pipeline.build import check_expressible

    bank = {"root": str(valid_bank.parent), "manifest": str(valid_bank), "effects": ["no_such_effect"]}
    with pytest.raises(CollectionLoraError, match="bank.effects names no_such_effect, not in the manifest"):
        check_expressible(load_params(REPO / "params.yaml", {"bank": bank}), cluster=False)
