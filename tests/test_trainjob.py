"""Distillation as a Kubeflow Trainer TrainJob: the job the SDK's Kubernetes backend POSTs, and how
submit_and_wait follows it. The tests run against a loopback fake of the Kubernetes API: one
torch-distributed ClusterTrainingRuntime (the Trainer's own manifest), TrainJobs as POSTed, and a
stand-in controller that gives a job its node pods. The slow test runs those nodes as real processes,
with the PET_* environment the Trainer's Torch plugin injects."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import params_for_bank
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from collectionlora.config import Params, merge
from collectionlora.errors import ConfigError
from collectionlora.trainjob import (
    TrainJobError,
    connect,
    distill_command,
    submit_and_wait,
    trainjob_name,
)

NAMESPACE = "team-a"
GROUP = "/apis/trainer.kubeflow.org/v1alpha1"
# kubeflow/trainer manifests/base/runtimes/torch_distributed.yaml (v2.3.0), as the API serves it.
TORCH_DISTRIBUTED = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1",
    "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed", "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {
        "mlPolicy": {"numNodes": 1, "torch": {}},
        "template": {
            "spec": {
                "replicatedJobs": [
                    {
                        "name": "node",
                        "template": {
                            "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                            "spec": {"template": {"spec": {"containers": [{"name": "node", "image": "pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime"}]}}},
                        },
                    }
                ]
            }
        },
    },
}
STAMP = "2026-01-01T00:00:00Z"


class ScriptedNode:
    """A node pod in `phase` that prints `lines`; it ends with `final` (Succeeded or Failed) once
    node-0's log has been followed to its end. `final=None` stays in `phase` for ever."""

    def __init__(self, lines: list[str], final: str | None = "Succeeded", phase: str = "Running"):
        self.lines, self.final, self._phase = lines, final, phase

    def phase(self) -> str:
        return self._phase

    def log(self, follow: bool):
        yield from (line + "\n" for line in self.lines)

    def finish(self) -> None:
        self._phase = self.final or self._phase


class ProcessNode:
    """A node pod as a process running the TrainJob's command."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path, log: Path):
        self.log_file = log
        with open(log, "wb") as sink:
            self.process = subprocess.Popen(command, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)

    def phase(self) -> str:
        code = self.process.poll()
        return "Running" if code is None else "Succeeded" if code == 0 else "Failed"

    def log(self, follow: bool):
        with open(self.log_file, "rb") as source:
            while True:
                chunk = source.readline()
                if chunk:
                    yield chunk
                elif not follow or self.process.poll() is not None:
                    yield source.read()
                    return
                else:
                    time.sleep(0.05)

    def finish(self) -> None:
        pass  # a process ends by itself


class FakeKubernetes:
    """The Kubernetes API calls the Trainer SDK makes, on 127.0.0.1. `launch(body)` plays the Trainer
    controller: it returns the node pods of a POSTed TrainJob."""

    def __init__(self, launch=None):
        self.launch = launch or (lambda body: [ScriptedNode(["step 1", "done"]) for _ in range(body["spec"]["trainer"].get("numNodes", 1))])
        self.posted: list[dict] = []
        self.deleted: list[str] = []
        self.jobs: dict[str, dict] = {}
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def add_job(self, body: dict, nodes: list) -> None:
        self.jobs[body["metadata"]["name"]] = {"body": body, "nodes": nodes}

    def client(self):
        from kubeflow.common.types import KubernetesBackendConfig
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return connect(KubernetesBackendConfig(namespace=NAMESPACE, client_configuration=configuration))

    @Request.application
    def app(self, request: Request) -> Response:
        path, method = request.path, request.method
        if path == "/api/v1/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public":
            return _json({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kubeflow-trainer-public"}, "data": {"kubeflow_trainer_version": "v2.3.0"}})
        if path.startswith(f"{GROUP}/namespaces/{NAMESPACE}/trainingruntimes/"):
            return _not_found(path)
        if path.startswith(f"{GROUP}/clustertrainingruntimes/"):
            return _json(TORCH_DISTRIBUTED) if path.endswith("/torch-distributed") else _not_found(path)
        jobs = f"{GROUP}/namespaces/{NAMESPACE}/trainjobs"
        if path == jobs and method == "POST":
            body = json.loads(request.get_data())
            if body["metadata"]["name"] in self.jobs:
                return _json({"kind": "Status", "code": 409, "reason": "AlreadyExists", "message": "already exists"}, 409)
            self.posted.append(body)
            self.add_job(body, self.launch(body))
            return _json(body, 201)
        if path.startswith(jobs + "/"):
            name = path.rsplit("/", 1)[1]
            if name not in self.jobs:
                return _not_found(path)
            if method == "DELETE":
                self.deleted.append(name)
                for node in self.jobs.pop(name)["nodes"]:
                    if isinstance(node, ProcessNode) and node.process.poll() is None:
                        node.process.kill()
                return _json({"kind": "Status", "status": "Success"})
            return _json(self._trainjob(name))
        if path == f"/api/v1/namespaces/{NAMESPACE}/pods":
            selected = re.search(r"jobset\.sigs\.k8s\.io/jobset-name=([a-z0-9-]+)", request.args.get("labelSelector", ""))
            name = selected[1] if selected else ""
            return _json({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": self._pods(name)})
        logs = re.fullmatch(rf"/api/v1/namespaces/{NAMESPACE}/pods/(.+)-node-0-(\d+)-x/log", path)
        if logs and logs[1] in self.jobs:
            nodes = self.jobs[logs[1]]["nodes"]
            follow = request.args.get("follow", "").lower() == "true"

            def stream():
                yield from nodes[int(logs[2])].log(follow)
                if follow:  # the training has ended: every node's pod ends
                    for node in nodes:
                        node.finish()

            return Response(stream(), mimetype="text/plain")
        return _not_found(path)

    def _trainjob(self, name: str) -> dict:
        job = self.jobs[name]
        phases = [node.phase() for node in job["nodes"]]
        conditions = []
        if all(phase in ("Succeeded", "Failed") for phase in phases):
            kind = "Complete" if all(phase == "Succeeded" for phase in phases) else "Failed"
            conditions = [{"type": kind, "status": "True", "reason": kind, "message": kind, "lastTransitionTime": STAMP}]
        body = json.loads(json.dumps(job["body"]))
        body["metadata"].update(namespace=NAMESPACE, creationTimestamp=STAMP)
        body["status"] = {"conditions": conditions}
        return body

    def _pods(self, name: str) -> list[dict]:
        if name not in self.jobs:
            return []
        return [
            {
                "metadata": {
                    "name": f"{name}-node-0-{i}-x",
                    "creationTimestamp": STAMP,
                    "labels": {"jobset.sigs.k8s.io/replicatedjob-name": "node", "batch.kubernetes.io/job-completion-index": str(i)},
                },
                "spec": {"containers": [{"name": "node", "image": "project"}]},
                "status": {"phase": node.phase()},
            }
            for i, node in enumerate(self.jobs[name]["nodes"])
        ]


def _json(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _not_found(path: str) -> Response:
    return _json({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": f"{path} not found"}, 404)


@pytest.fixture
def fake():
    server = FakeKubernetes()
    server.thread.start()
    yield server
    server.server.shutdown()
    for job in server.jobs.values():
        for node in job["nodes"]:
            if isinstance(node, ProcessNode) and node.process.poll() is None:
                node.process.kill()


@pytest.fixture
def volume(tiny_params: Params, tmp_path: Path) -> tuple[Params, Path]:
    """Params whose bank, rollouts and output are on a 'checkpoint volume' at tmp_path; GPUs, 3 nodes,
    a node selector and the default toleration."""
    mount = tmp_path / "pvc"
    raw = merge(
        tiny_params.model_dump(mode="json"),
        {
            "bank": {"root": str(mount / "data"), "manifest": str(mount / "data" / "bank.yaml")},
            "kfp": {
                "image": "registry.example/collectionlora:1.2.3",
                "distill": {
                    "backend": "trainjob", "num_nodes": 3, "accelerator_count": 4, "cpu": "16", "memory": "120Gi",
                    "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
                    "checkpoint_mount": str(mount), "checkpoint_pvc": "collectionlora-checkpoints", "timeout_s": 30,
                },
            },
        },
    )
    return Params.model_validate(raw), mount / "runs" / "r1"


def _submit(params: Params, run: Path, client, **kwargs) -> str:
    return submit_and_wait(params, run / "params.yaml", run / "rollouts", run / "student", client=client, poll_s=1, **kwargs)


def test_the_posted_trainjob_has_nodes_resources_image_command_env_references_and_the_volume(fake, volume, capsys):
    params, run = volume
    name = _submit(params, run, fake.client())

    assert name == trainjob_name(run / "student") and len(fake.posted) == 1
    body = fake.posted[0]
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert body["metadata"]["name"] == name
    assert body["metadata"]["labels"]["app.kubernetes.io/part-of"] == "collectionlora"
    spec = body["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime"}
    assert spec["activeDeadlineSeconds"] == 30
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 3
    assert trainer["image"] == "registry.example/collectionlora:1.2.3"
    resources = {"cpu": "16", "memory": "120Gi", "nvidia.com/gpu": "4"}
    assert trainer["resourcesPerNode"] == {"requests": resources, "limits": resources}
    # torchrun with one process per GPU; nodes, node rank and master come from the runtime's PET_* env.
    assert trainer["command"] == [
        "torchrun", "--nproc-per-node=4", "--no-python", "collectionlora", "distill",
        "--params", str(run / "params.yaml"), "--rollouts", str(run / "rollouts"), "--out", str(run / "student"),
    ]
    env = {e["name"]: e for e in trainer["env"]}
    assert env["PYTHONUNBUFFERED"] == {"name": "PYTHONUNBUFFERED", "value": "1"}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "collectionlora-s3", "key": key}}}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "collectionlora-mlflow", "key": key}}}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"):
        assert env[key] == {"name": key, "valueFrom": {"configMapKeyRef": {"name": "collectionlora-config", "key": key}}}
    assert not any("value" in e for name_, e in env.items() if name_ != "PYTHONUNBUFFERED")  # references only

    [patch] = spec["runtimePatches"]
    assert patch["manager"] == "trainer.kubeflow.org/kubeflow-sdk"
    [job] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == "node"
    pod = job["template"]["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": "collectionlora-checkpoints"}}]
    assert pod["containers"] == [{"name": "node", "volumeMounts": [{"name": "checkpoints", "mountPath": params.kfp.distill.checkpoint_mount}]}]
    assert "env" not in pod["containers"][0]  # the Trainer webhook refuses env patches on the node container
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

    out = capsys.readouterr().out
    assert "a fresh run" in out and "3 nodes, torchrun --nproc-per-node=4 on each" in out
    assert "step 1\ndone" in out  # node-0's log, streamed


def test_a_cpu_trainjob_asks_for_no_accelerator_and_one_process_per_node(fake, volume):
    params, run = volume
    raw = params.model_dump(mode="json")
    raw["kfp"]["distill"].update(accelerator_count=0, node_selector={}, tolerations=[])
    cpu = Params.model_validate(raw)
    _submit(cpu, run, fake.client())
    trainer = fake.posted[0]["spec"]["trainer"]
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "16", "memory": "120Gi"}
    # Explicit: without GPUs, the Torch plugin's "auto" would start one process per requested CPU.
    assert "--nproc-per-node=1" in trainer["command"]
    pod = fake.posted[0]["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_an_interrupted_run_on_the_volume_is_resumed_by_the_nodes(fake, volume, monkeypatch):
    params, run = volume
    monkeypatch.setattr("collectionlora.distill.run.auto_resume", lambda *args: True)
    _submit(params, run, fake.client())
    assert fake.posted[0]["spec"]["trainer"]["command"][-1] == "--resume"
    assert "--auto-resume" not in distill_command(Path("/p"), Path("/r"), Path("/o"), 2, False)  # refused under torchrun


def test_a_failed_trainjob_is_one_clear_error(fake, volume):
    params, run = volume
    fake.launch = lambda body: [ScriptedNode(["Traceback ...", "boom"], final="Failed"), ScriptedNode([], phase="Succeeded"), ScriptedNode([], phase="Succeeded")]
    with pytest.raises(TrainJobError) as error:
        _submit(params, run, fake.client())
    message = str(error.value)
    assert "\n" not in message and trainjob_name(run / "student") in message and "failed" in message


def test_a_trainjob_that_never_starts_times_out_with_one_line(fake, volume):
    params, run = volume
    short = Params.model_validate(merge(params.model_dump(mode="json"), {"kfp": {"distill": {"timeout_s": 3}}}))
    fake.launch = lambda body: [ScriptedNode([], final=None, phase="Pending")]
    started = time.monotonic()
    with pytest.raises(TrainJobError, match=r"did not finish within kfp.distill.timeout_s=3 s") as error:
        _submit(short, run, fake.client())
    assert time.monotonic() - started < 15 and "\n" not in str(error.value)


def test_a_retry_reattaches_to_a_running_job_and_replaces_a_failed_one(fake, volume, capsys):
    params, run = volume
    name = trainjob_name(run / "student")
    fake.add_job({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": {"name": name},
                  "spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": 1}}}, [ScriptedNode(["still going"])])
    assert _submit(params, run, fake.client()) == name
    assert fake.posted == [] and "re-attaching" in capsys.readouterr().out

    fake.jobs[name]["nodes"] = [ScriptedNode([], final="Failed", phase="Failed")]
    _submit(params, run, fake.client())
    assert fake.deleted == [name] and len(fake.posted) == 1


def test_paths_off_the_checkpoint_volume_are_refused_before_anything_is_submitted(fake, volume):
    params, run = volume
    with pytest.raises(ConfigError, match=r"rollouts /tmp/elsewhere is not on the checkpoint volume"):
        submit_and_wait(params, run / "params.yaml", Path("/tmp/elsewhere"), run / "student", client=fake.client())
    bank_elsewhere = Params.model_validate(merge(params.model_dump(mode="json"), {"bank": {"root": "data", "manifest": "data/bank.yaml"}}))
    with pytest.raises(ConfigError, match=r"bank.root data is not on the checkpoint volume"):
        _submit(bank_elsewhere, run, fake.client())
    assert fake.posted == []


def test_a_runtime_that_is_missing_or_not_torch_is_named(fake, volume):
    params, run = volume
    missing = Params.model_validate(merge(params.model_dump(mode="json"), {"kfp": {"distill": {"trainer_runtime": "mpi-distributed"}}}))
    with pytest.raises(TrainJobError, match=r"no usable Trainer runtime 'mpi-distributed' .*HTTP 404"):
        _submit(missing, run, fake.client())
    TORCH_DISTRIBUTED["metadata"]["labels"]["trainer.kubeflow.org/framework"] = "mpi"
    try:
        with pytest.raises(ConfigError, match=r"torch-distributed is a 'mpi' runtime"):
            _submit(params, run, fake.client())
    finally:
        TORCH_DISTRIBUTED["metadata"]["labels"]["trainer.kubeflow.org/framework"] = "torch"


def test_no_cluster_is_one_line(volume, tmp_path):
    from kubeflow.common.types import KubernetesBackendConfig
    from kubernetes import client

    with pytest.raises(TrainJobError, match=r"^no Kubernetes configuration") as error:
        connect(KubernetesBackendConfig(namespace=NAMESPACE, config_file=str(tmp_path / "no-kubeconfig")))
    assert "\n" not in str(error.value)

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{port}"
    configuration.retries = 0
    unreachable = connect(KubernetesBackendConfig(namespace=NAMESPACE, client_configuration=configuration))
    params, run = volume
    with pytest.raises(TrainJobError, match=r"cannot reach the Kubernetes API") as error:
        _submit(params, run, unreachable)
    assert "\n" not in str(error.value)


# ---- the nodes as real processes --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torch_plugin_nodes(workdir: Path):
    """Start a POSTed TrainJob's nodes as the Trainer does. Every node runs spec.trainer.command with
    spec.trainer's literal env and the PET_* variables of the Torch plugin
    (pkg/runtime/framework/plugins/torch/torch.go, v2.3.0): PET_NNODES=numNodes, PET_NPROC_PER_NODE (with
    no GPU, the requested CPU count), PET_NODE_RANK=the job completion index, and PET_MASTER_ADDR/PORT.
    The master is node 0's headless-service name in a cluster and 127.0.0.1 here."""

    def launch(body: dict) -> list[ProcessNode]:
        trainer = body["spec"]["trainer"]
        nodes, port = trainer["numNodes"], _free_port()
        cpus = int(trainer["resourcesPerNode"]["requests"]["cpu"])
        literal = {e["name"]: e["value"] for e in trainer.get("env", []) if "value" in e}
        base = {
            **os.environ, **literal, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": "",
            "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": str(max(1, cpus)), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
        }
        return [
            ProcessNode(trainer["command"], {**base, "PET_NODE_RANK": str(rank)}, workdir, workdir / f"node-{rank}.log")
            for rank in range(nodes)
        ]

    return launch


@pytest.mark.slow
def test_a_two_node_cpu_trainjob_distils_one_student_with_gloo(fake, tiny_bank, tiny_params, tmp_path, capsys):
    from collectionlora.distill.export import LORA_WEIGHTS
    from collectionlora.stages import run_rollout

    mount = tmp_path / "pvc"
    root = mount / "data"
    shutil.copytree(tiny_bank, root)
    run = mount / "runs" / "r1"
    params = params_for_bank(
        tiny_params, root,
        base={"threads": 1},
        distill={"max_steps": 6, "generator_every": 2, "checkpoint_every": 3, "batch_size": 2},  # 2 nodes x 1 item: 2 effects
        kfp={"distill": {"num_nodes": 2, "accelerator_count": 0, "cpu": "2", "checkpoint_mount": str(mount), "timeout_s": 600}},
    )
    run_rollout(params, run / "rollouts", None)
    (run / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    workdir = tmp_path / "node-cwd"
    workdir.mkdir()
    fake.launch = torch_plugin_nodes(workdir)

    submit_and_wait(params, run / "params.yaml", run / "rollouts", run / "student", client=fake.client(), poll_s=1)

    metrics = json.loads((run / "student" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["ranks_in_sync"] is True  # 2 nodes x 1 process, not 2 x PET_NPROC_PER_NODE
    assert (run / "student" / LORA_WEIGHTS).is_file()
    assert re.search(r"^6 steps \(\d+ generator updates\) in \d+ s -> ", capsys.readouterr().out, re.M)  # rank 0's last line, streamed from node-0
