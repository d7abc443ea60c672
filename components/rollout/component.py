from kfp.dsl import Dataset, Input, Output


def rollout(bank: Input[Dataset], bank_digest: str, params: str, effect: str, rollouts: Output[Dataset]) -> None:
    """One effect's teacher targets (one task per effect: the pipeline fans out over the bank).
    `bank_digest` (the bank's content, from validate) is read only by Kubeflow's cache key."""
    from pathlib import Path

    from collectionlora.pipeline.task_params import ROLLOUT_SECTIONS, task_params
    from collectionlora.stages import run_rollout

    run_rollout(task_params(params, bank.path, ROLLOUT_SECTIONS), Path(rollouts.path), [effect])
