from kfp.dsl import Dataset, Input, Metrics, Model, Output


def distill(
    bank: Input[Dataset], rollouts: Input[Dataset], params: str, checkpoint_root: str, run_id: str,
    student: Output[Model], metrics: Output[Metrics],
) -> None:
    """All teachers and few-step sampling into one student LoRA, worked out on the checkpoint volume
    under runs/<run id>, so that a retry of this task resumes from the failed attempt's last checkpoint."""
    from pathlib import Path

    from collectionlora.pipeline.distill_task import distill_task
    from collectionlora.pipeline.outputs import log_scalars
    from collectionlora.pipeline.task_params import task_params

    summary = distill_task(task_params(params, bank.path), Path(rollouts.path), Path(checkpoint_root), run_id, Path(student.path))
    log_scalars(metrics.log_metric, summary)
