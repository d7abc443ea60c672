"""The tracking server going away, against a real `mlflow server` that the tests stop and start again:
training goes on with its metrics kept in metrics.jsonl and sent once the server is back (or reported
as not logged, in one line, never a traceback per step); a registration cut off after creating its
model version leaves nothing half registered; a server unreachable from the start is one line at once.
Short MLflow timeouts and no retries (MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES) keep it fast."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import params_for_bank

from collectionlora.config import TrackingConfig
from collectionlora.distill.run import HISTORY, METRICS
from collectionlora.registry.register import PENDING
from collectionlora.registry.server import MlflowServer, ServerStore, free_port
from collectionlora.tracking import RunLogger

CLI = [sys.executable, "-m", "collectionlora.cli"]
FAST_FAILURE = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One server for the module (tests stop it and start it again on the same port and store)."""
    folder = tmp_path_factory.mktemp("tracking_server")
    store = ServerStore(f"sqlite:///{folder / 'mlflow.db'}", folder / "artifacts", folder / "server.log")
    with MlflowServer(store, free_port()) as running:
        yield running


def _database(server: MlflowServer) -> Path:
    return Path(server.store.backend_store_uri.removeprefix("sqlite:///"))


def _params_file(tiny_workflow: dict, folder: Path, **sections) -> Path:
    params = params_for_bank(tiny_workflow["params"], tiny_workflow["root"], Path(tiny_workflow["params"].bank.manifest).name, **sections)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


def _environment(server: MlflowServer) -> dict[str, str]:
    return {**os.environ, **FAST_FAILURE, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": server.url}


def test_metrics_kept_while_the_server_is_away_are_logged_when_it_is_back(server, tmp_path, monkeypatch, capsys):
    for name, value in {**FAST_FAILURE, "MLFLOW_TRACKING_URI": server.url}.items():
        monkeypatch.setenv(name, value)
    logger = RunLogger(TrackingConfig(uri="sqlite:///unused.db", experiment="outage"), "run", {"a": {"b": 1}}, tmp_path / "m.jsonl", active=True)
    logger.log({"loss": 1.0}, 1)
    server.stop()
    for step in (2, 3, 4):
        logger.log({"loss": float(step)}, step)  # no exception, no traceback: training goes on
    server.start()
    logger.log({"loss": 5.0}, 5)
    logger.close()

    client = mlflow.MlflowClient(server.url)
    assert [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "loss")] == [(s, float(s)) for s in range(1, 6)]
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    assert [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 2, said  # once when it went away, once when it came back: not once per step
    assert said[0].startswith(f"tracking: {server.url} did not take the metrics (") and "logged when the server answers again" in said[0]
    assert said[1] == f"tracking: {server.url} answers again; the metrics kept meanwhile are logged"


def test_a_registration_cut_off_after_creating_its_version_leaves_nothing_half_registered(server, tiny_workflow, tmp_path):
    params = _params_file(tiny_workflow, tmp_path)
    command = [*CLI, "register", "--params", str(params), "--collection", str(tiny_workflow["student"]),
               "--evaluation", str(tiny_workflow["eval"]), "--manifest", str(tiny_workflow["manifest"]), "--out", str(tmp_path / "reg")]
    log = tmp_path / "register.log"
    for attempt in range(3):  # until the registration is frozen between creating its version and finishing it
        name = f"outage-{attempt}"
        with open(log, "w", encoding="utf-8") as handle:
            process = subprocess.Popen([*command, "--set", f"registry.model_name={name}"], env=_environment(server), stdout=handle, stderr=handle)
            while process.poll() is None and not _versions(server, name):
                time.sleep(0.002)
            process.send_signal(signal.SIGSTOP)
        if _versions(server, name) and _versions(server, name)[0][1]:
            break
        process.send_signal(signal.SIGCONT)
        process.wait()
    else:
        pytest.fail("the registration was never caught between creating its version and finishing it")

    server.stop()  # the server goes away while the registration is frozen half way
    process.send_signal(signal.SIGCONT)
    assert process.wait(timeout=120) == 1
    errors = [line for line in log.read_text().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert errors[0].startswith(f"error: registry: registering version 1 of '{name}' failed (")
    assert errors[0].endswith(f"and so did deleting it: it stays tagged {PENDING}, and the next `collectionlora register` of this LoRA deletes it")

    server.start()
    assert _versions(server, name) == [("1", True)]  # marked unfinished: never reported as registered
    again = subprocess.run([*command, "--set", f"registry.model_name={name}"], env=_environment(server), capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"deleted version 1 of '{name}': an interrupted registration left it unfinished" in again.stderr
    assert f"registered {name} version 2 (challenger" in again.stdout
    assert _versions(server, name) == [("2", False)]
    client = mlflow.MlflowClient(server.url)
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["2"]
    assert str(client.get_registered_model(name).aliases["challenger"]) == "2"


def test_a_distillation_goes_on_when_the_server_goes_away_and_says_what_was_not_logged(server, tiny_workflow, tmp_path):
    params = _params_file(tiny_workflow, tmp_path, distill={"max_steps": 30})
    out = tmp_path / "student"
    command = [*CLI, "distill", "--params", str(params), "--rollouts", str(tiny_workflow["rollouts"]), "--out", str(out)]
    with open(tmp_path / "distill.log", "w", encoding="utf-8") as handle:
        process = subprocess.Popen(command, env=_environment(server), stdout=handle, stderr=handle)
        while process.poll() is None and not ((out / HISTORY).exists() and (out / HISTORY).read_text()):
            time.sleep(0.01)
        server.stop()  # for good: this test is the module's last user of the server
        assert process.wait(timeout=600) == 0, (tmp_path / "distill.log").read_text()[-3000:]

    output = (tmp_path / "distill.log").read_text()
    said = [line for line in output.splitlines() if line.startswith("tracking:")]
    assert "Traceback" not in output and len(said) == 2, output[-3000:]
    assert said[0].startswith(f"tracking: {server.url} did not take the metrics (")
    assert said[1].startswith(f"tracking: {server.url} still does not answer: ") and "were not logged (they are in " in said[1]
    assert (out / METRICS).exists()
    steps = [json.loads(line)["step"] for line in (out / HISTORY).read_text().splitlines()]
    assert steps == list(range(2, 31, 2))  # every record kept locally
    run_id = json.loads((out / "collection.json").read_text())["tracking_run_id"]
    logged = [m.step for m in mlflow.MlflowClient(server.store.backend_store_uri).get_metric_history(run_id, "loss_critic_fm")]
    assert logged == steps[: len(logged)] and len(logged) < len(steps)  # what the server took before it went


def test_a_server_unreachable_from_the_start_is_one_line_at_once(tiny_workflow, tmp_path):
    params = _params_file(tiny_workflow, tmp_path)
    environment = {**os.environ, **FAST_FAILURE, "MLFLOW_TRACKING_URI": "http://192.0.2.1:5000"}  # TEST-NET-1: never routed
    started = time.monotonic()
    done = subprocess.run([*CLI, "distill", "--params", str(params), "--rollouts", str(tiny_workflow["rollouts"]), "--out", str(tmp_path / "student")],
                          env=environment, capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert done.stderr.startswith("error: MLFLOW_TRACKING_URI / tracking.uri: http://192.0.2.1:5000 is unreachable")
    assert time.monotonic() - started < 120
    assert not (tmp_path / "student").exists()  # checked before anything was loaded or written


def _versions(server: MlflowServer, name: str) -> list[tuple[str, bool]]:
    """(version, tagged unfinished) of `name`, read from the server's database directly (fast enough to catch
    a registration half way; MLflow keeps a deleted version's row, marked Deleted_Internal)."""
    with sqlite3.connect(f"file:{_database(server)}?mode=ro", uri=True, timeout=5) as database:
        rows = database.execute(
            "SELECT version FROM model_versions WHERE name = ? AND current_stage != 'Deleted_Internal' ORDER BY version", (name,)
        ).fetchall()
        pending = {v for (v,) in database.execute("SELECT version FROM model_version_tags WHERE name = ? AND key = ?", (name, PENDING))}
    return [(str(v), v in pending) for (v,) in rows]
