"""Distillation beyond one node: a Kubeflow Trainer TrainJob, submitted with the Kubeflow SDK
(`kubeflow.trainer.TrainerClient`), with node-0's log streamed here until the job finishes.

Every node runs the same `collectionlora distill` under torchrun. The `torch-distributed` runtime does
not wrap the command in torchrun. Its Torch plugin only sets PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT, and torchrun uses them as its defaults, so the
command is `torchrun --nproc-per-node=N --no-python collectionlora distill ...`. N is given explicitly
(the accelerators per node, 1 on CPU): with no GPU requested, the plugin's `auto` would mean one process
per requested CPU. `--auto-resume` refuses to run under torchrun. The submitting process (one process,
with the volume mounted) therefore decides between a fresh run and `--resume`.

Launch (the KFP distill task when kfp.distill.backend is trainjob):
    submit_and_wait(params, params_file, rollouts, out)
with params_file, rollouts, out and the bank on the checkpoint volume (kfp.distill.checkpoint_pvc),
which every node mounts at kfp.distill.checkpoint_mount. The paths are the same on every node.

What the SDK (kubeflow 0.5.0) cannot express is added through its own extension points:
- volumes, the volume mount, node selector and tolerations: a `RuntimePatch` option (.spec.runtimePatches,
  Trainer >= v2.2);
- env from Secrets and the ConfigMap: the Trainer webhook refuses env patches on the `node` container,
  and `CustomTrainerContainer.env` takes literal values only. So `TrainerEnvFrom` puts `valueFrom`
  entries in .spec.trainer.env through a small `KubernetesBackend` subclass. kubeflow/sdk#477 proposes
  the same option upstream.
Credentials are never read here: only Secret names and keys go into the TrainJob.

The cluster side needs a torch runtime named kfp.distill.trainer_runtime and a ReadWriteMany
checkpoint PVC. The task's service account needs create/get/delete on trainjobs, get on
(cluster)trainingruntimes, and list on pods plus get on pods/log.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubeflow.common.types import KubernetesBackendConfig
from kubeflow.trainer import CustomTrainerContainer, TrainerClient
from kubeflow.trainer.backends.base import RuntimeBackend
from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend
from kubeflow.trainer.constants import constants as trainer_constants
from kubeflow.trainer.options import (
    ActiveDeadlineSeconds,
    ContainerPatch,
    JobSetSpecPatch,
    JobSetTemplatePatch,
    JobSpecPatch,
    JobTemplatePatch,
    Labels,
    Name,
    PodSpecPatch,
    PodTemplatePatch,
    ReplicatedJobPatch,
    RuntimePatch,
    TrainerCommand,
    TrainingRuntimeSpecPatch,
)
from kubeflow_trainer_api import models

from collectionlora.config import Params
from collectionlora.distill.launch import distill_arguments
from collectionlora.errors import CollectionLoraError, ConfigError

NODE = trainer_constants.NODE  # the runtime's trainer replicated job and its container
CREATED, RUNNING = trainer_constants.TRAINJOB_CREATED, trainer_constants.TRAINJOB_RUNNING
COMPLETE, FAILED = trainer_constants.TRAINJOB_COMPLETE, trainer_constants.TRAINJOB_FAILED
CHECKPOINT_VOLUME = "checkpoints"
SECRET_KEYS = {
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    "mlflow": ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"),
}
CONFIG_MAP_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")


class TrainJobError(CollectionLoraError):
    """The TrainJob could not be submitted, failed, or did not finish in time."""


def processes_per_node(params: Params) -> int:
    """One process per accelerator of a node, one on a CPU node (as the single-node task does)."""
    return max(1, params.kfp.distill.accelerator_count)


def distill_command(params_file: Path, rollouts: Path, out: Path, processes: int, resume: bool) -> list[str]:
    """The command every node runs. torchrun takes nodes, node rank and master from the runtime's
    PET_* environment, so one command serves every node."""
    return ["torchrun", f"--nproc-per-node={processes}", "--no-python", "collectionlora", *distill_arguments(params_file, rollouts, out, resume)]


def trainjob_name(out: Path) -> str:
    """The same name for the same output folder. A retried KFP task then finds the TrainJob of the
    attempt before it instead of starting a second one that writes the same checkpoints."""
    return "collectionlora-" + hashlib.sha256(os.path.normpath(str(out)).encode()).hexdigest()[:12]


def resources_per_node(params: Params) -> dict[str, str]:
    """Requests (= limits) of each node: CPU, memory and, when asked for, the accelerators."""
    distill = params.kfp.distill
    resources = {"cpu": distill.cpu, "memory": distill.memory}
    if distill.accelerator_count > 0:
        resources[distill.accelerator_type] = str(distill.accelerator_count)
    return resources


def secret_env(params: Params) -> list[dict]:
    """The tasks' environment, by reference only: Secret keys (S3, MLflow credentials) and the ConfigMap's
    MLflow endpoints."""
    env = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": getattr(params.kfp.secrets, which), "key": key}}}
        for which, keys in SECRET_KEYS.items()
        for key in keys
    ]
    env += [{"name": key, "valueFrom": {"configMapKeyRef": {"name": params.kfp.config_map, "key": key}}} for key in CONFIG_MAP_KEYS]
    return env


def check_on_volume(params: Params, params_file: Path, rollouts: Path, out: Path) -> None:
    """Fail here, before any node is scheduled, if a node could not see a path it reads. The nodes
    share only the checkpoint volume."""
    mount = Path(params.kfp.distill.checkpoint_mount)
    paths = {
        "params file": params_file,
        "rollouts": rollouts,
        "out": out,
        "bank.root": params.bank.root,  # the manifest's folder holds the base, teachers and sources
        "bank.manifest": params.bank.manifest,
    }
    for what, path in paths.items():
        normal = Path(os.path.normpath(str(path)))
        if not normal.is_absolute() or not normal.is_relative_to(mount):
            raise ConfigError(
                f"{what} {path} is not on the checkpoint volume (kfp.distill.checkpoint_mount={mount}), the only folder every TrainJob node mounts"
            )


@dataclass
class TrainerEnvFrom:
    """Add .spec.trainer.env entries that take their value from a Secret or ConfigMap key (`valueFrom`).
    Kubernetes backend only, through `connect()`'s client."""

    env: list[dict]

    def __call__(self, job_spec: dict[str, Any], trainer: Any, backend: RuntimeBackend) -> None:
        if not isinstance(backend, _EnvFromKubernetesBackend):
            raise ValueError(f"TrainerEnvFrom needs the client of collectionlora.trainjob.connect(), not {type(backend).__name__}")
        job_spec.setdefault("spec", {}).setdefault("trainer", {})["env"] = self.env


class _EnvFromKubernetesBackend(KubernetesBackend):
    """The SDK's Kubernetes backend, plus the `env` of a TrainerEnvFrom option in the Trainer spec."""

    def _get_trainjob_spec(self, *args: Any, trainer_overrides: dict | None = None, **kwargs: Any):
        spec = super()._get_trainjob_spec(*args, trainer_overrides=trainer_overrides, **kwargs)
        env = (trainer_overrides or {}).get("env")
        if env:
            spec.trainer = spec.trainer or models.TrainerV1alpha1Trainer()
            spec.trainer.env = [*(spec.trainer.env or []), *(models.IoK8sApiCoreV1EnvVar.from_dict(e) for e in env)]
        return spec


class _TrainerClient(TrainerClient):
    """TrainerClient on a given backend. Its own __init__ always builds the stock KubernetesBackend,
    and every method of it delegates to `self.backend`."""

    def __init__(self, backend: KubernetesBackend):
        self.backend = backend


def connect(backend_config: KubernetesBackendConfig | None = None) -> TrainerClient:
    """A TrainerClient on the cluster: in a pod, its service account and namespace; elsewhere, the kube
    config's current context. One clear line when there is neither."""
    from kubernetes.config import ConfigException

    try:
        return _TrainerClient(_EnvFromKubernetesBackend(backend_config or KubernetesBackendConfig()))
    except ConfigException as error:
        raise TrainJobError(f"no Kubernetes configuration (not in a cluster pod, and no usable kube config): {_first_line(error)}") from error


def build_trainer(params: Params, params_file: Path, rollouts: Path, out: Path, resume: bool) -> tuple[CustomTrainerContainer, list]:
    """The SDK trainer (image, nodes, resources per node) and the options that complete the TrainJob:
    the command, env from Secrets, the checkpoint volume, placement, the deadline, name and labels."""
    distill = params.kfp.distill
    trainer = CustomTrainerContainer(
        image=params.kfp.image,
        num_nodes=distill.num_nodes,
        resources_per_node=resources_per_node(params),
        env={"PYTHONUNBUFFERED": "1"},  # node-0's log reaches the stream line by line
    )
    pod = PodSpecPatch(
        volumes=[{"name": CHECKPOINT_VOLUME, "persistentVolumeClaim": {"claimName": distill.checkpoint_pvc}}],
        containers=[ContainerPatch(name=NODE, volume_mounts=[{"name": CHECKPOINT_VOLUME, "mountPath": distill.checkpoint_mount}])],
        node_selector=dict(distill.node_selector) or None,
        tolerations=[t.model_dump(exclude_none=True) for t in distill.tolerations] or None,
    )
    patch = RuntimePatch(
        training_runtime_spec=TrainingRuntimeSpecPatch(
            template=JobSetTemplatePatch(
                spec=JobSetSpecPatch(
                    replicated_jobs=[
                        ReplicatedJobPatch(name=NODE, template=JobTemplatePatch(spec=JobSpecPatch(template=PodTemplatePatch(spec=pod))))
                    ]
                )
            )
        )
    )
    options = [
        Name(trainjob_name(out)),
        Labels({"app.kubernetes.io/part-of": "collectionlora", "app.kubernetes.io/component": "distill"}),
        TrainerCommand(distill_command(params_file, rollouts, out, processes_per_node(params), resume)),
        TrainerEnvFrom(secret_env(params)),
        patch,
        ActiveDeadlineSeconds(distill.timeout_s),
    ]
    return trainer, options


def submit_and_wait(params: Params, params_file: Path, rollouts: Path, out: Path, client: TrainerClient | None = None, poll_s: int = 10) -> str:
    """Run the distillation as a TrainJob and return its name once it is Complete. Its node-0 log
    goes to stdout. A job of an earlier attempt at the same `out` is re-attached if it still runs or
    has finished, and replaced (resuming from its checkpoints) if it failed."""
    from collectionlora.distill.run import auto_resume

    params_file, rollouts, out = Path(params_file), Path(rollouts), Path(out)
    check_on_volume(params, params_file, rollouts, out)
    client = client or connect()
    name = trainjob_name(out)
    job = f"TrainJob {getattr(client.backend, 'namespace', '?')}/{name}"
    deadline = time.monotonic() + params.kfp.distill.timeout_s
    previous = _status_if_exists(client, name, job)
    if previous in (CREATED, RUNNING, COMPLETE):
        print(f"distill: re-attaching to {job} ({previous}) left by an earlier attempt", flush=True)
    else:
        if previous == FAILED:
            print(f"distill: {job} of an earlier attempt failed; replacing it", flush=True)
            _delete(client, name, job, deadline, poll_s)
        runtime = _torch_runtime(client, params.kfp.distill.trainer_runtime)
        resume = auto_resume(params, rollouts, out)
        trainer, options = build_trainer(params, params_file, rollouts, out, resume)
        _sdk(lambda: client.train(runtime=runtime, trainer=trainer, options=options), f"cannot submit {job}")
        nodes, processes = params.kfp.distill.num_nodes, processes_per_node(params)
        print(f"distill: {'resuming the interrupted run' if resume else 'a fresh run'} in {out} on {job}: {nodes} nodes, torchrun --nproc-per-node={processes} on each", flush=True)
    state = _wait(client, name, job, {RUNNING, COMPLETE, FAILED}, deadline, params, poll_s)
    if state.status == RUNNING:
        _stream_node_log(client, name, job)
        state = _wait(client, name, job, {COMPLETE, FAILED}, deadline, params, poll_s)
    if state.status == FAILED:
        namespace = getattr(client.backend, "namespace", "default")
        raise TrainJobError(f"{job} failed (node-0's log is above; kubectl -n {namespace} describe trainjob {name})")
    return name


def _status_if_exists(client: TrainerClient, name: str, job: str) -> str | None:
    try:
        return client.get_job(name).status
    except (RuntimeError, TimeoutError) as error:
        if _api_status(error) == 404:
            return None
        raise TrainJobError(f"cannot read {job}: {_reason(error)}") from error


def _torch_runtime(client: TrainerClient, name: str):
    runtime = _sdk(lambda: client.get_runtime(name), f"no usable Trainer runtime {name!r} (kfp.distill.trainer_runtime)")
    if runtime.trainer.framework != "torch":
        raise ConfigError(
            f"params: kfp.distill.trainer_runtime: {name} is a {runtime.trainer.framework!r} runtime; distill needs a torch one (torchrun's PET_* environment)"
        )
    return runtime


def _delete(client: TrainerClient, name: str, job: str, deadline: float, poll_s: int) -> None:
    """Delete a job and wait until its name is free again."""
    _sdk(lambda: client.delete_job(name), f"cannot delete {job}")
    while _status_if_exists(client, name, job) is not None:
        if time.monotonic() > deadline:
            raise TrainJobError(f"{job} was deleted but still exists at the deadline")
        time.sleep(min(poll_s, 2))


def _wait(client: TrainerClient, name: str, job: str, statuses: set[str], deadline: float, params: Params, poll_s: int):
    remaining = int(deadline - time.monotonic())
    try:
        if remaining <= poll_s:
            raise TimeoutError
        return client.wait_for_job_status(name, status=statuses, timeout=remaining, polling_interval=poll_s)
    except TimeoutError as error:
        raise TrainJobError(f"{job} did not finish within kfp.distill.timeout_s={params.kfp.distill.timeout_s} s (it stays on the cluster until its deadline)") from error
    except RuntimeError as error:
        raise TrainJobError(f"cannot follow {job}: {_reason(error)}") from error


def _stream_node_log(client: TrainerClient, name: str, job: str) -> None:
    """node-0's log (rank 0 logs, see distill/parallel.py) as it is written. A broken stream is noted,
    and the wait for the job's status goes on."""
    try:
        for line in client.get_job_logs(name, follow=True):
            print(line, flush=True)
    except (RuntimeError, TimeoutError) as error:
        print(f"distill: the log stream of {job} ended early ({_reason(error)}); waiting for the job", flush=True)


def _sdk(call, what: str):
    try:
        return call()
    except (RuntimeError, TimeoutError) as error:
        raise TrainJobError(f"{what}: {_reason(error)}") from error


def _api_status(error: BaseException) -> int | None:
    from kubernetes.client.exceptions import ApiException

    for cause in _chain(error):
        if isinstance(cause, ApiException):
            return cause.status
    return None


def _reason(error: BaseException) -> str:
    """The root cause in one line: the API's own message, or why the API could not be reached."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    for cause in _chain(error):
        if isinstance(cause, ApiException):
            try:
                message = json.loads(cause.body or "{}").get("message") or cause.reason
            except (TypeError, ValueError):
                message = cause.reason
            hint = " (the task's service account needs RBAC on trainer.kubeflow.org)" if cause.status == 403 else ""
            return f"HTTP {cause.status}: {_first_line(message)}{hint}"
        if isinstance(cause, (HTTPError, OSError)):
            return f"cannot reach the Kubernetes API ({_first_line(getattr(cause, 'reason', None) or cause)})"
    if isinstance(error, TimeoutError):
        return "the Kubernetes API did not answer in time"
    return _first_line(error)


def _chain(error: BaseException):
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _first_line(value: object) -> str:
    text = str(value).strip()
    return (text.splitlines() or [type(value).__name__])[0][:300]
