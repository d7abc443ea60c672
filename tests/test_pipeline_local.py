"""The whole Kubeflow pipeline under kfp.local on the tiny bank: every component's code path, ending with
a version in a local MLflow registry."""

from __future__ import annotations

import builtins
import shutil
from pathlib import Path

import pytest
from conftest import REPO, params_for_bank

from collectionlora.config import Params, merge

# Gates that pass or fail whatever the tiny student scores (as in conftest's registry fixtures).
LENIENT_GATE = {"beat_bcr_of": [], "bcr_margin": 1.0, "accuracy_tolerance": 1.0, "effect_floor": 0.0}


def _pipeline_params(tiny_params: Params, root: Path, work: Path) -> Params:
    params = params_for_bank(tiny_params, root, "bank-3.yaml", tracking={"uri": f"sqlite:///{work / 'mlflow.db'}"})
    raw = merge(params.model_dump(mode="json"), {"registry": {"model_name": "kfp-local"}})
    raw["evaluate"]["gate"] = merge(raw["evaluate"]["gate"], LENIENT_GATE)
    return Params.model_validate(raw)


@pytest.mark.slow
def test_the_pipeline_runs_under_kfp_local_and_registers(tiny_bank: Path, tiny_params: Params, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from collectionlora.pipeline.local_run import run_local

    root = tmp_path / "data"
    shutil.copytree(tiny_bank, root)
    print_before = builtins.print
    params = _pipeline_params(tiny_params, root, tmp_path)
    result = run_local(params, tmp_path / "kfp", REPO)

    client = MlflowClient(result["tracking_uri"])
    versions = client.search_model_versions("name='kfp-local'")
    assert len(versions) == 1
    version = client.get_model_version("kfp-local", versions[0].version)
    assert version.tags["kfp_run_id"] not in ("", "none")
    assert client.get_registered_model("kfp-local").aliases["challenger"] == version.version
    assert version.tags["effects"] == "3"
    assert builtins.print is print_before  # kfp.local's indenting print() does not outlive the run
