from kfp.dsl import Dataset, Input, Model, Output


def baselines(bank: Input[Dataset], rollouts: Input[Dataset], student: Input[Model], params: str, baselines: Output[Dataset]) -> None:
    """The alternatives the student is compared with: FM all-in-1 and the PEFT merges of the teachers."""
    from pathlib import Path

    from collectionlora.pipeline.task_params import task_params
    from collectionlora.stages import run_baselines

    run_baselines(task_params(params, bank.path), Path(rollouts.path), Path(student.path), Path(baselines.path))
