from kfp.dsl import Artifact, Dataset, Input, Model, Output


def register(
    bank: Input[Dataset],
    manifest: Input[Dataset],
    student: Input[Model],
    evaluation: Input[Dataset],
    params: str,
    kfp_run_id: str,
    registration: Output[Artifact],
) -> str:
    """The student as a new MLflow model version (alias challenger; champion by the registry's
    gate-and-beat rule), its lineage tagged with this pipeline run; returns the version."""
    import os
    from pathlib import Path

    from collectionlora.pipeline.task_params import task_params
    from collectionlora.registry.lineage import KFP_RUN_ID_ENV
    from collectionlora.stages import run_register

    os.environ[KFP_RUN_ID_ENV] = kfp_run_id
    manifest_file = Path(manifest.path) / "manifest.json"
    record = run_register(task_params(params, bank.path), Path(student.path), Path(evaluation.path), manifest_file, Path(registration.path), True)
    return str(record["version"])
