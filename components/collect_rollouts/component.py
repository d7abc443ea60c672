from typing import List

from kfp.dsl import Dataset, Input, Output


def collect_rollouts(bank: Input[Dataset], params: str, parts: Input[List[Dataset]], rollouts: Output[Dataset]) -> None:
    """The fan-out's per-effect rollout folders as one folder with the combined index."""
    from pathlib import Path

    from collectionlora.bank import open_bank
    from collectionlora.pipeline.task_params import task_params
    from collectionlora.rollout import merge_rollouts

    merge_rollouts(open_bank(task_params(params, bank.path).bank), [Path(p.path) for p in parts], Path(rollouts.path))
