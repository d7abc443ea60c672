"""`collectionlora pipeline upload|run` against a fake KFP v2beta1 API server on loopback, through a real
kfp.Client: a first upload creates the pipeline, later ones new versions; a run creates its experiment
and carries the compiled spec and our parameters; the token travels only as a bearer header; and every
mistake (broken IR, bad host, no token, unknown or unusable parameter) is one line before any request."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from google.protobuf import json_format
from kfp_fake_server import FakeKfp
from typer.testing import CliRunner

from collectionlora.config import load_params
from collectionlora.pipeline.build import compile_pipeline, read_ir
from collectionlora.errors import PipelineError
from collectionlora.pipeline.client import connect, default_version_name, run, upload
from collectionlora.pipeline.task_params import params_json

BANK_URI = "s3://bucket/data"  # compile_pipeline refuses a null bank_uri for a cluster
TOKEN = "kfp-test-token-5c0ffee-not-a-real-one"  # distinctive, so every output can be searched for it
KFP_ENVIRONMENT = (
    "KFP_TOKEN", "KF_PIPELINES_SA_TOKEN_PATH", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT",
    "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME", "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
)
PARAMETERS = "bank_uri, checkpoint_root, data_version, params"


@pytest.fixture(autouse=True)
def clean_kfp_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token, endpoint or experiment from the developer's shell, and no ~/.config/kfp/context.json."""
    import kfp.client.client

    for name in KFP_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kfp.client.client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "no-kfp-context.json"))


@pytest.fixture(scope="module")
def compiled_ir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    params = load_params(REPO / "params.yaml", {"kfp": {"bank_uri": BANK_URI}})
    return compile_pipeline(params, tmp_path_factory.mktemp("ir") / "collectionlora.yaml", REPO)


@pytest.fixture
def kfp_server():
    with FakeKfp() as server:
        yield server


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Name resolution and connections fail, and are recorded: a test asserts none was attempted."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in a test that must not reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def cli(*args: str):
    from collectionlora.cli import app

    return CliRunner().invoke(app, ["pipeline", *args, "--params", str(REPO / "params.yaml"), "--repo", str(REPO)])


def one_line_error(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def posted(server: FakeKfp, path: str) -> list[dict]:
    return [r for r in server.requests if r["method"] == "POST" and r["path"] == f"/apis/v2beta1/{path}"]


def broken_copy(ir: Path, folder: Path) -> Path:
    """The compiled IR with a field PipelineSpec does not have, in its first task."""
    documents = list(yaml.safe_load_all(ir.read_text()))
    first_task = next(iter(documents[0]["root"]["dag"]["tasks"].values()))
    first_task["retryPolicyy"] = {"maxRetryCount": 3}
    broken = folder / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return broken


# ---- upload ------------------------------------------------------------------------------------------


def test_upload_creates_the_pipeline_then_new_versions(kfp_server: FakeKfp, compiled_ir: Path) -> None:
    first = cli("upload", "--host", kfp_server.url, "--set", f"kfp.bank_uri={BANK_URI}", "--set", "kfp.rollout_parallelism=3")
    assert first.exit_code == 0, first.output
    [pipeline] = kfp_server.pipelines.values()
    assert pipeline["display_name"] == "collectionlora"  # kfp.pipeline_name
    [upload] = posted(kfp_server, "pipelines/upload")
    spec = yaml.safe_load_all(upload["upload"]["text"]).__next__()
    assert spec["root"]["inputDefinitions"]["parameters"]["bank_uri"]["defaultValue"] == BANK_URI  # compiled with --set
    assert pipeline["pipeline_id"] in first.stdout and first.stderr == ""

    second = cli("upload", "--host", kfp_server.url, "--ir", str(compiled_ir))
    assert second.exit_code == 0, second.output
    assert len(kfp_server.pipelines) == 1
    [version] = posted(kfp_server, "pipelines/upload_version")
    digest = hashlib.sha256(compiled_ir.read_bytes()).hexdigest()[:12]
    assert version["args"]["pipelineid"] == pipeline["pipeline_id"]
    assert re.fullmatch(rf"\d{{8}}T\d{{6}}Z-{digest}", version["args"]["name"]), version["args"]
    assert version["upload"]["text"] == compiled_ir.read_text()

    third = cli("upload", "--host", kfp_server.url, "--ir", str(compiled_ir), "--version", "v-named")
    assert third.exit_code == 0, third.output
    names = [v["display_name"] for v in kfp_server.versions.values()]
    assert names == ["collectionlora", version["args"]["name"], "v-named"]

    other = cli("upload", "--host", kfp_server.url, "--ir", str(compiled_ir), "--name", "another")
    assert other.exit_code == 0, other.output
    assert sorted(p["display_name"] for p in kfp_server.pipelines.values()) == ["another", "collectionlora"]


def test_a_version_for_a_new_pipeline_is_reported_unused(kfp_server: FakeKfp, compiled_ir: Path) -> None:
    result = cli("upload", "--host", kfp_server.url, "--ir", str(compiled_ir), "--version", "v1")
    assert result.exit_code == 0, result.output
    assert [v["display_name"] for v in kfp_server.versions.values()] == ["collectionlora"]
    assert "note: version 'v1' not used" in result.stdout


def test_the_default_version_name_is_utc_time_then_the_ir_hash(compiled_ir: Path) -> None:
    when = datetime(2026, 3, 4, 7, 8, 9, tzinfo=timezone(timedelta(hours=2)))
    digest = hashlib.sha256(compiled_ir.read_bytes()).hexdigest()[:12]
    assert default_version_name(compiled_ir, when) == f"20260304T050809Z-{digest}"


# ---- run ---------------------------------------------------------------------------------------------


def test_run_creates_the_experiment_and_sends_the_spec_and_parameters(kfp_server: FakeKfp, compiled_ir: Path) -> None:
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    raw["distill"]["max_steps"] = 11
    arguments = {"data_version": "abc123", "bank_uri": "s3://other/data", "params": params_json(raw)}
    flags = [part for key, value in arguments.items() for part in ("--param", f"{key}={value}")]

    result = cli("run", "--host", kfp_server.url, "--ir", str(compiled_ir), "--experiment", "nightly", "--run-name", "r1", *flags)
    assert result.exit_code == 0, result.output
    [experiment] = posted(kfp_server, "experiments")
    assert experiment["json"]["display_name"] == "nightly"
    [run] = posted(kfp_server, "runs")
    body = run["json"]
    assert body["display_name"] == "r1"
    assert body["experiment_id"] == next(iter(kfp_server.experiments))
    assert body["runtime_config"]["parameters"] == arguments
    assert body["service_account"] == "collectionlora-pipeline-runner"  # params.yaml kfp.service_account (RBAC for TrainJobs)
    spec, platform = read_ir(compiled_ir)
    assert body["pipeline_spec"] == {"pipeline_spec": json_format.MessageToDict(spec), "platform_spec": json_format.MessageToDict(platform)}
    [run_id] = kfp_server.runs
    assert f"{kfp_server.url}/#/runs/details/{run_id}" in result.stdout and result.stderr == ""

    again = cli("run", "--host", kfp_server.url, "--ir", str(compiled_ir), "--experiment", "nightly")
    assert again.exit_code == 0, again.output
    assert len(posted(kfp_server, "experiments")) == 1 and len(kfp_server.runs) == 2  # the experiment is reused


def test_run_without_an_ir_compiles_params_yaml_with_set_as_defaults(kfp_server: FakeKfp) -> None:
    result = cli("run", "--host", kfp_server.url, "--set", f"kfp.bank_uri={BANK_URI}", "--set", "distill.max_steps=7")
    assert result.exit_code == 0, result.output
    [run] = posted(kfp_server, "runs")
    inputs = run["json"]["pipeline_spec"]["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
    assert yaml.safe_load(inputs["params"]["defaultValue"])["distill"]["max_steps"] == 7
    assert inputs["bank_uri"]["defaultValue"] == BANK_URI
    assert run["json"]["runtime_config"].get("parameters") in (None, {})
    assert [e["display_name"] for e in kfp_server.experiments.values()] == ["collectionlora"]  # kfp.pipeline_name


# ---- the token ---------------------------------------------------------------------------------------


def test_the_token_is_a_bearer_header_and_never_printed_or_written(tmp_path: Path) -> None:
    home, scratch, work = (tmp_path / name for name in ("home", "tmp", "work"))
    for folder in (home, scratch, work):
        folder.mkdir()
    environment = {key: value for key, value in os.environ.items() if key not in KFP_ENVIRONMENT}
    environment.update(KFP_TOKEN=TOKEN, HOME=str(home), TMPDIR=str(scratch), PYTHONDONTWRITEBYTECODE="1")
    with FakeKfp(token=TOKEN) as server:
        result = subprocess.run(
            [sys.executable, "-m", "collectionlora.cli", "pipeline", "upload", "--host", server.url,
             "--params", str(REPO / "params.yaml"), "--repo", str(REPO), "--set", f"kfp.bank_uri={BANK_URI}"],
            capture_output=True, text=True, cwd=work, env=environment, timeout=120,
        )
    assert result.returncode == 0, result.stderr
    assert len(server.pipelines) == 1
    assert server.requests and all(r["authorization"] == f"Bearer {TOKEN}" for r in server.requests)
    assert TOKEN not in result.stdout + result.stderr and result.stderr == ""
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert not [path for path in written if TOKEN.encode() in path.read_bytes()]


def test_the_token_may_come_from_a_service_account_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compiled_ir: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "token"))
    with FakeKfp(token=TOKEN) as server:
        result = cli("run", "--host", server.url, "--ir", str(compiled_ir))
    assert result.exit_code == 0, result.output
    assert len(server.runs) == 1 and {r["authorization"] for r in server.requests} == {f"Bearer {TOKEN}"}


def test_a_refused_token_is_one_line_at_once(monkeypatch: pytest.MonkeyPatch, compiled_ir: Path) -> None:
    monkeypatch.setenv("KFP_TOKEN", "a-wrong-token-value")
    with FakeKfp(token=TOKEN) as server:
        started = time.monotonic()
        result = cli("upload", "--host", server.url, "--ir", str(compiled_ir))
        elapsed = time.monotonic() - started
    line = one_line_error(result)
    assert "HTTP 401" in line and "KFP_TOKEN" in line and "a-wrong-token-value" not in result.output
    assert elapsed < 10 and not server.pipelines


def test_a_missing_token_for_a_remote_host_fails_before_any_network_access(no_network: list) -> None:
    result = cli("upload", "--host", "http://kfp.example.invalid")  # no --ir, no bank_uri: the token check comes first
    line = one_line_error(result)
    assert "KFP_TOKEN" in line and "kfp.example.invalid" in line
    assert no_network == []


def test_a_host_that_is_not_an_http_url_is_one_line(no_network: list) -> None:
    line = one_line_error(cli("run", "--host", "kfp.example.invalid"))
    assert "http(s)://" in line and no_network == []


# ---- refused before any request ------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["upload", "run"])
@pytest.mark.parametrize("breakage", ["unknown field", "not yaml"])
def test_a_broken_ir_is_refused_before_any_request(
    command: str, breakage: str, kfp_server: FakeKfp, compiled_ir: Path, tmp_path: Path
) -> None:
    if breakage == "unknown field":
        broken = broken_copy(compiled_ir, tmp_path)
    else:
        broken = tmp_path / "broken.yaml"
        broken.write_text("pipelineInfo: [unclosed\n")
    line = one_line_error(cli(command, "--host", kfp_server.url, "--ir", str(broken)))
    assert str(broken) in line
    assert kfp_server.requests == []


@pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")
def test_the_fake_server_itself_refuses_a_broken_ir(kfp_server: FakeKfp, compiled_ir: Path, tmp_path: Path) -> None:
    """The fake's own check (what the tests above rely on not reaching) answers 400, as a real server would."""
    import kfp
    import kfp_server_api

    client = kfp.Client(host=kfp_server.url)
    with pytest.raises(kfp_server_api.ApiException) as refused:
        client.upload_pipeline(str(broken_copy(compiled_ir, tmp_path)), pipeline_name="broken")
    assert refused.value.status == 400 and "retryPolicyy" in str(refused.value.body)
    assert not kfp_server.pipelines


@pytest.mark.parametrize("command", ["upload", "run"])
def test_an_unreachable_host_is_one_line_and_fast(command: str, compiled_ir: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    line = one_line_error(cli(command, "--host", f"http://127.0.0.1:{port}", "--ir", str(compiled_ir)))
    assert "unreachable" in line and f"127.0.0.1:{port}" in line
    assert time.monotonic() - started < 10


def test_upload_and_run_check_their_input_themselves(kfp_server: FakeKfp, compiled_ir: Path, tmp_path: Path) -> None:
    """The library functions refuse on their own, not only behind the CLI's checks."""
    client = connect(kfp_server.url)
    with pytest.raises(PipelineError, match="not a valid KFP pipeline IR"):
        upload(client, broken_copy(compiled_ir, tmp_path), "collectionlora", None, "")
    with pytest.raises(PipelineError, match=f"valid: {PARAMETERS}"):
        run(client, compiled_ir, "nightly", {"bank": "s3://x/data"}, None, "collectionlora", "collectionlora-pipeline-runner")
    assert not [r for r in kfp_server.requests if r["method"] == "POST"]


def test_a_host_that_never_answers_is_one_line_after_the_probe_timeout(compiled_ir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from collectionlora.pipeline import client

    monkeypatch.setattr(client, "PROBE_TIMEOUT_S", 0.3)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        host = "http://127.0.0.1:%d" % silent.getsockname()[1]
        started = time.monotonic()
        line = one_line_error(cli("upload", "--host", host, "--ir", str(compiled_ir)))
    assert "unreachable" in line and "timed out" in line and time.monotonic() - started < 5


def test_an_unknown_param_lists_the_valid_ones(kfp_server: FakeKfp, compiled_ir: Path) -> None:
    line = one_line_error(cli("run", "--host", kfp_server.url, "--ir", str(compiled_ir), "--param", "bank=s3://x/data"))
    assert "bank" in line and f"valid: {PARAMETERS}" in line
    assert kfp_server.requests == []


def _params_with(**changes) -> str:
    raw = load_params(REPO / "params.yaml").model_dump(mode="json")
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw[section][key] = value
    return params_json(raw)


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("params={not json", "not JSON"),
        (f"params={_params_with(lora__rank=0)}", "lora.rank"),
        (f"params={_params_with(base__device='cuda')}", "accelerator_count"),  # the distill task would refuse it hours in
        ("bank_uri=", "bank_uri is empty"),
    ],
    ids=["not-json", "invalid-field", "gpus-disagree", "empty-bank-uri"],
)
def test_a_value_the_pipeline_cannot_use_is_one_line(argument: str, expected: str, kfp_server: FakeKfp, compiled_ir: Path) -> None:
    line = one_line_error(cli("run", "--host", kfp_server.url, "--ir", str(compiled_ir), "--param", argument))
    assert expected in line
    assert kfp_server.requests == []
