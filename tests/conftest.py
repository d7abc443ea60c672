"""Shared pytest fixtures."""

from __future__ import annotations

import json
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


# ---- the embedded tiny pipeline ------------------------------------------------------------------
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

from collectionlora.config import Params, load_params

REPO = Path(__file__).resolve().parents[1]
# CI-sized versions of params.yaml: the same code, a 2-layer model and a few steps per stage.
TINY_OVERRIDES = {
    # One torch thread: on 2 shared cores, two processes with 2 threads each slow down many times over.
    "base": {"tiny": {"num_layers": 2}, "threads": 1},
    "sampling": {"teacher_steps": 4},
    "lora": {"rank": 4, "alpha": 4, "steps": 20, "batch_size": 4},
    "judge": {"steps": 60, "procedural_per_effect": 16, "holdout_per_effect": 4},
    "demo_bank": {
        "sizes": {"default": 2, "fifty": 3},
        "pairs_per_effect": 4,
        "general_sources": 4,
        "eval_sources": 4,
        "base_steps": 4,
        "base_batch_size": 4,
        "teacher_check_steps": 2,
        "teacher_pass_rate": 0.0,
    },
    "rollout": {"batch_size": 4},
    "prompting": {"trigger_candidates": 4},
    "distill": {
        "rank": 4, "alpha": 4, "max_steps": 10, "batch_size": 2, "processes": 1, "effects_per_batch": 2, "checkpoint_every": 5, "log_every": 2,
        "generator_every": 5, "lr": 0.001, "ts_weight": 1.0,  # the paper's two time scales and weights
        "anchor_steps": 0,  # the paper's cold start; the anchor-phase tests set their own
        "compile_anchor": False,  # a compile costs more than a tiny run; test_distill.py tests it once
    },
    "acceleration": {"max_steps": 2},
    "incremental": {"generator_steps_per_effect": 2},
    "baselines": {"fm_all_in_one": {"source": "train", "steps": 4, "batch_size": 4, "rank": 4, "alpha": 4}, "merges": {"rank": 4}},
    "evaluate": {"eval_images": 2, "stochastic_seeds": 2, "student_steps": [8, 1], "cost_requests": 8, "processes": 1},
}


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Everything in the suite runs on one torch thread (see TINY_OVERRIDES): deterministic, and no
    oversubscription when the 2 cores are shared with another job."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_tracking_server_from_the_environment():
    """Tests never reach a developer's tracking server, and `mlflow.set_tracking_uri` in one test (it
    exports MLFLOW_TRACKING_URI) must not redirect the next test's runs."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def tiny_params() -> Params:
    return load_params(REPO / "params.yaml", TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory, tiny_params: Params) -> Path:
    """A freshly initialised (not pretrained) tiny pipeline saved with save_pretrained."""
    from collectionlora.base_pretrain import general_instructions
    from collectionlora.models.tiny import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny") / "base"
    build_tiny_pipeline(tiny_params.base.tiny, general_instructions(), seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def backbone(tiny_params: Params, tiny_base_dir: Path):
    from collectionlora.models.backbone import Backbone

    return Backbone.load(tiny_params.base, tiny_base_dir)


@pytest.fixture(scope="session")
def tiny_bank(tmp_path_factory: pytest.TempPathFactory, tiny_params: Params) -> Path:
    """A tiny demo bank built once per session (3 effects, teachers of a few steps); returns its root.
    bank.yaml holds 2 effects, bank-3.yaml all 3. Copy it before changing anything."""
    from collectionlora.demo_bank import build_demo_bank

    root = tmp_path_factory.mktemp("tiny_bank") / "data"
    build_demo_bank(tiny_params, root)
    return root


def params_for_bank(params: Params, root: Path, manifest: str = "bank.yaml", **sections: dict) -> Params:
    """`params` pointed at the bank under `root`, with extra section overrides."""
    from collectionlora.config import merge

    raw = merge(params.model_dump(mode="json"), {"bank": {"root": str(root), "manifest": str(root / manifest)}, **sections})
    return Params.model_validate(raw)


def workflow_params_file(workflow: dict, folder: Path) -> Path:
    """The tiny workflow's params as `folder`/params.yaml for CLI runs, logging to a store of their own."""
    import yaml

    params = params_for_bank(workflow["params"], workflow["root"], Path(workflow["params"].bank.manifest).name,
                             tracking={"uri": f"sqlite:///{folder / 'mlflow.db'}"})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


# ---- S3 on a loopback moto server -----------------------------------------------------------------
# Dummy credentials with distinctive values, so a test can grep everything written for them.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "collectionlora-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "collectionlora-test-secret-0123456789",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (a free port) for the session; yields its endpoint URL.
    Credentials are the dummy S3_CREDENTIALS; tests pass them to the processes they start."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_bucket(endpoint: str, name: str):
    """Create the bucket `name` on the moto server (buckets are not created on demand); returns a boto3 client."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=name)
    return client


# ---- one tiny workflow for the session: validate -> rollout -> distill -> baselines -> evaluate -------
TINY_WORKFLOW_MANIFEST = "bank-3.yaml"  # 2 deterministic effects and 1 stochastic one


@pytest.fixture(scope="session")
def tiny_workflow(tiny_bank: Path, tiny_params: Params, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A private copy of the tiny bank run through every stage up to evaluate (read-only for tests):
    {"params", "root", "work", "manifest", "rollouts", "student", "baselines", "baselines_report", "eval", "metrics"}."""
    from collectionlora.stages import run_baselines, run_distill, run_evaluate, run_rollout, run_validate

    work = tmp_path_factory.mktemp("workflow")
    root = work / "data"
    shutil.copytree(tiny_bank, root)
    params = params_for_bank(tiny_params, root, TINY_WORKFLOW_MANIFEST, tracking={"uri": f"sqlite:///{work / 'mlflow.db'}"})
    run_validate(params.bank, work / "bank", None)
    run_rollout(params, work / "rollouts", None)
    run_distill(params, work / "rollouts", work / "student")
    report = run_baselines(params, work / "rollouts", work / "student", work / "baselines")
    metrics = run_evaluate(params, work / "student", work / "baselines", work / "eval")
    return {
        "params": params, "root": root, "work": work, "manifest": work / "bank" / "manifest.json", "rollouts": work / "rollouts",
        "student": work / "student", "baselines": work / "baselines", "baselines_report": report, "eval": work / "eval", "metrics": metrics,
    }


# ---- the tiny workflow's students in an MLflow registry ---------------------------------------------
TINY_MODEL_NAME = "tiny-collection"
# Gates that pass or fail whatever the tiny student scores, so each registry branch is reached for real.
LENIENT_GATE = {"beat_bcr_of": [], "bcr_margin": 1.0, "accuracy_tolerance": 1.0, "effect_floor": 0.0}
IMPOSSIBLE_GATE = {"beat_bcr_of": ["student_8nfe"]}  # BCR below its own: never


@pytest.fixture(scope="session")
def registered_store(tiny_workflow: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two students registered in the workflow's sqlite store (beside their distillation runs): version 1
    (the workflow's student, gate passed -> champion) and version 2 (a second seed, gate failed ->
    challenger only). Read-only: tests that change the store use `tiny_registry`, a copy."""
    from collectionlora.config import merge
    from collectionlora.stages import run_distill, run_evaluate, run_register

    work = tmp_path_factory.mktemp("registry")
    base = tiny_workflow["params"].model_dump(mode="json")

    def params_with(gate: dict, **sections) -> Params:
        raw = merge(base, {"registry": {"model_name": TINY_MODEL_NAME}, **sections})
        raw["evaluate"]["gate"] = merge(raw["evaluate"]["gate"], gate)
        return Params.model_validate(raw)

    first = params_with(LENIENT_GATE)
    run_evaluate(first, tiny_workflow["student"], tiny_workflow["baselines"], work / "eval-1")
    registrations = [run_register(first, tiny_workflow["student"], work / "eval-1", tiny_workflow["manifest"], work / "reg-1")]
    second = params_with(IMPOSSIBLE_GATE, distill={"seed": 1})
    run_distill(second, tiny_workflow["rollouts"], work / "student-2")
    run_evaluate(second, work / "student-2", tiny_workflow["baselines"], work / "eval-2")
    registrations.append(run_register(second, work / "student-2", work / "eval-2", tiny_workflow["manifest"], work / "reg-2"))
    return {
        "work": work, "database": tiny_workflow["work"] / "mlflow.db", "params": first, "registrations": registrations,
        "students": [tiny_workflow["student"], work / "student-2"], "evaluations": [work / "eval-1", work / "eval-2"],
    }


@pytest.fixture
def tiny_registry(registered_store: dict, tiny_workflow: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A private copy of `registered_store`'s database (artifacts stay shared, read-only), with what a
    test needs to drive it: {"params", "tracking_uri", "artifacts", "model_name", "versions", "champion",
    "image", "predict_input", "students"}."""
    import base64

    import pandas as pd

    from collectionlora.config import merge

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copy(registered_store["database"], tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = Params.model_validate(merge(registered_store["params"].model_dump(mode="json"), {"tracking": {"uri": uri}}))
    image = sorted((tiny_workflow["root"] / "eval").rglob("*.png"))[0]
    effect = json.loads((tiny_workflow["student"] / "collection.json").read_text())["prompts"]["effects"][0]["effect"]
    row = {"image": base64.b64encode(image.read_bytes()).decode(), "effect": effect, "steps": 8, "seed": 0}
    return {
        "params": params,
        "tracking_uri": uri,
        "artifacts": registered_store["database"].parent / "artifacts",
        "model_name": TINY_MODEL_NAME,
        "versions": [r["version"] for r in registered_store["registrations"]],
        "champion": registered_store["registrations"][-1]["champion"],
        "image": image,
        "predict_input": pd.DataFrame([row]),
        "students": registered_store["students"],
        "evaluations": registered_store["evaluations"],
        "manifest": tiny_workflow["manifest"],
        "effect": effect,
    }
