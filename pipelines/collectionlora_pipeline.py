"""The Kubeflow pipeline: validate -> rollout per effect (fan-out) -> collect -> distill (GPUs, retries,
resume from the checkpoint volume) -> baselines -> evaluate -> register, only if the gate passed.

`build_pipeline` bakes params.yaml in at compile time: its values become the pipeline parameters'
defaults (one `params` JSON text, validated again by every task with the same models as the CLI) and the
tasks' resources, placement, retries and Secret/ConfigMap names. Compile with `collectionlora pipeline
compile`; no logic lives here beyond wiring. (No `from __future__ import annotations`: kfp reads the
parameter annotations as types.)
"""

from collections.abc import Callable
from typing import List

from kfp import dsl, kubernetes

from collectionlora.config import KfpResourcesConfig, Params
from collectionlora.pipeline.task_params import params_json
from components import on_image

# Environment variables a task reads from the cluster: the ConfigMap's keys, and each Secret's keys.
CONFIG_MAP_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")
S3_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_SECRET_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def build_pipeline(params: Params, image: str, data_version: str) -> Callable:
    """The pipeline function for `params` (its defaults and task settings) on the project `image`;
    `data_version` is the md5 of data.dvc the bank was pushed as."""
    settings, kfp, components = params, params.kfp, on_image(image)  # `params` is also the pipeline parameter's name

    # The fan-out is a pipeline of its own: its `effects` input is then a parameter of the loop's parent,
    # which kfp.local can iterate (it cannot iterate a task's output directly; a cluster can do both).
    @dsl.pipeline(name="rollout-each-effect")
    def rollout_each_effect(bank: dsl.Input[dsl.Dataset], bank_digest: str, params: str, effects: List[str]) -> List[dsl.Dataset]:
        with dsl.ParallelFor(effects, parallelism=kfp.rollout_parallelism) as effect:
            rollout = _on_model(components.rollout(bank=bank, bank_digest=bank_digest, params=params, effect=effect), settings)
        return dsl.Collected(rollout.outputs["rollouts"])

    # The gate is a pipeline input of its own for the same reason: kfp.local resolves a condition on a
    # parameter of the condition's parent, not on a sibling task's output.
    @dsl.pipeline(name="register-if-gate-passed")
    def register_if_gate_passed(
        gate_passed: bool, bank: dsl.Input[dsl.Dataset], manifest: dsl.Input[dsl.Dataset], student: dsl.Input[dsl.Model],
        evaluation: dsl.Input[dsl.Dataset], params: str,
    ) -> None:
        with dsl.If(gate_passed == True, name="gate-passed"):  # noqa: E712 (a KFP condition, not a Python test)
            registered = components.register(
                bank=bank, manifest=manifest, student=student, evaluation=evaluation, params=params,
                kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            )
            registered.set_caching_options(False)  # registering is the point of the run, never a cache hit
            _with_tracking(_on_cpu(registered, kfp.task), settings)

    @dsl.pipeline(name=kfp.pipeline_name, description="Distil a bank of effect LoRAs into one few-step LoRA (CollectionLoRA).")
    def collectionlora(
        bank_uri: str = kfp.bank_uri or "",
        params: str = params_json(params),
        data_version: str = data_version,
        checkpoint_root: str = kfp.distill.checkpoint_mount,
    ) -> None:
        bank = dsl.importer(artifact_uri=bank_uri, artifact_class=dsl.Dataset, reimport=False)
        validated = _on_cpu(components.validate(bank=bank.output, params=params, data_version=data_version), kfp.task)
        rollouts = rollout_each_effect(
            bank=bank.output, bank_digest=validated.outputs["bank_digest"], params=validated.outputs["rollout_params"],
            effects=validated.outputs["effects"],
        )
        collected = _on_cpu(components.collect_rollouts(bank=bank.output, params=params, parts=rollouts.output), kfp.task)
        student = _distill_settings(
            components.distill(
                bank=bank.output, rollouts=collected.outputs["rollouts"], params=params, checkpoint_root=checkpoint_root,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            ),
            settings,
        )
        baselines = _on_model(
            components.baselines(bank=bank.output, rollouts=collected.outputs["rollouts"], student=student.outputs["student"], params=params),
            settings,
        )
        evaluated = _on_model(
            components.evaluate(
                bank=bank.output, student=student.outputs["student"], baselines=baselines.outputs["baselines"], params=params
            ),
            settings,
        )
        register_if_gate_passed(
            gate_passed=evaluated.outputs["gate_passed"], bank=bank.output, manifest=validated.outputs["manifest"],
            student=student.outputs["student"], evaluation=evaluated.outputs["evaluation"], params=params,
        )

    return collectionlora


def _on_cpu(task: dsl.PipelineTask, resources: KfpResourcesConfig) -> dsl.PipelineTask:
    return (
        task.set_cpu_request(resources.cpu).set_cpu_limit(resources.cpu)
        .set_memory_request(resources.memory).set_memory_limit(resources.memory)
    )


def _on_model(task: dsl.PipelineTask, params: Params) -> dsl.PipelineTask:
    """A task that runs the model (rollout, baselines, evaluate): `kfp.task` resources and accelerators."""
    _on_cpu(task, params.kfp.task)
    if params.kfp.task.accelerator_count:
        task.set_accelerator_type(params.kfp.distill.accelerator_type).set_accelerator_limit(params.kfp.task.accelerator_count)
        _placement(task, params)
    return task


def _distill_settings(task: dsl.PipelineTask, params: Params) -> dsl.PipelineTask:
    """Accelerators and placement (unless a TrainJob does the training), retries with backoff, a
    timeout, the checkpoint volume (a retry resumes from it) and the tracking server's credentials."""
    config = params.kfp.distill
    if config.backend == "task":
        _on_cpu(task, config)
        if config.accelerator_count:
            task.set_accelerator_type(config.accelerator_type).set_accelerator_limit(config.accelerator_count)
        _placement(task, params)
    else:  # the TrainJob's nodes get the accelerators; this task submits it and follows its logs
        _on_cpu(task, params.kfp.task)
    task.set_retry(num_retries=config.retries, backoff_duration=config.backoff, backoff_factor=2.0)
    kubernetes.set_timeout(task, config.timeout_s)
    kubernetes.mount_pvc(task, pvc_name=config.checkpoint_pvc, mount_path=config.checkpoint_mount)
    return _with_tracking(task, params)


def _placement(task: dsl.PipelineTask, params: Params) -> None:
    config = params.kfp.distill
    for label, value in sorted(config.node_selector.items()):
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    for toleration in config.tolerations:
        kubernetes.add_toleration(
            task, key=toleration.key, operator=toleration.operator, value=toleration.value, effect=toleration.effect
        )


def _with_tracking(task: dsl.PipelineTask, params: Params) -> dsl.PipelineTask:
    """The MLflow server's address from the ConfigMap; credentials from Secrets (optional: a server
    without auth, or with proxied artifacts, needs none), never as parameters."""
    kfp = params.kfp
    kubernetes.use_config_map_as_env(task, config_map_name=kfp.config_map, config_map_key_to_env={k: k for k in CONFIG_MAP_ENV})
    kubernetes.use_secret_as_env(task, secret_name=kfp.secrets.s3, secret_key_to_env={k: k for k in S3_SECRET_ENV}, optional=True)
    kubernetes.use_secret_as_env(task, secret_name=kfp.secrets.mlflow, secret_key_to_env={k: k for k in MLFLOW_SECRET_ENV}, optional=True)
    return task
