"""Registration through a real `mlflow server` (127.0.0.1, one worker) whose artifacts go to S3 on a
loopback moto server: the model version, its files in the bucket, the pyfunc loaded by alias through the
server, and no credential value in anything that was written or printed."""

from __future__ import annotations

import base64
import io
import mlflow
import numpy as np
import pytest
from conftest import S3_CREDENTIALS, TINY_MODEL_NAME, s3_bucket
from PIL import Image
from typer.testing import CliRunner

from collectionlora.cli import app
from collectionlora.registry.server import MlflowServer, ServerStore, free_port

BUCKET = "mlflow"


@pytest.fixture(scope="module")
def s3_tracking_server(s3_server: str, tmp_path_factory: pytest.TempPathFactory):
    """An MLflow server with a sqlite backend and proxied artifacts in s3://mlflow/artifacts (moto);
    yields (url, moto boto3 client, server folder). The credentials reach it through the environment."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    client = s3_bucket(s3_server, BUCKET)
    environment = pytest.MonkeyPatch()
    for name, value in {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3_server}.items():
        environment.setenv(name, value)
    store = ServerStore(f"sqlite:///{folder / 'mlflow.db'}", f"s3://{BUCKET}/artifacts", folder / "server.log")
    try:
        with MlflowServer(store, free_port()) as server:
            yield server.url, client, folder
    finally:
        environment.undo()


def test_register_through_a_server_with_s3_artifacts_and_load_by_alias(s3_tracking_server, tiny_registry, tmp_path, monkeypatch, capfd):
    url, s3, folder = s3_tracking_server
    for name, value in {**S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9"}.items():  # the client needs no S3: proxied
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(__import__("yaml").safe_dump(tiny_registry["params"].model_dump(mode="json")))
    args = ["register", "--params", str(params_file), "--collection", str(tiny_registry["students"][0]),
            "--evaluation", str(tiny_registry["evaluations"][0]), "--manifest", str(tiny_registry["manifest"]), "--out", str(tmp_path / "reg")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"registered {TINY_MODEL_NAME} version 1 (challenger, champion) in {url}" in result.output

    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(k.endswith("artifacts/pytorch_lora_weights.safetensors") for k in keys)
    assert any(k.endswith("evaluation/gate.json") for k in keys)
    mlflow.set_tracking_uri(url)
    model = mlflow.pyfunc.load_model(f"models:/{TINY_MODEL_NAME}@champion")
    served = model.predict(tiny_registry["predict_input"])["image"][0]
    mlflow.set_tracking_uri(tiny_registry["tracking_uri"])
    local = mlflow.pyfunc.load_model(f"models:/{TINY_MODEL_NAME}/1").predict(tiny_registry["predict_input"])["image"][0]
    assert np.array_equal(_pixels(served), _pixels(local))

    # No credential value anywhere: the bucket's objects, the server's database and log, our outputs.
    secrets = [S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"].encode(), S3_CREDENTIALS["AWS_ACCESS_KEY_ID"].encode()]
    written = {f"s3://{BUCKET}/{k}": s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}
    written.update({str(p): p.read_bytes() for p in [*folder.rglob("*"), *(tmp_path / "reg").rglob("*")] if p.is_file()})
    captured = capfd.readouterr()
    written["output"] = (result.output + captured.out + captured.err).encode()
    leaks = [name for name, data in written.items() if any(secret in data for secret in secrets)]
    assert not leaks
    assert len(written) > 10


def _pixels(image_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB"))

