from typing import NamedTuple

from kfp.dsl import Dataset, Input, Output


def validate(
    bank: Input[Dataset], params: str, data_version: str, manifest: Output[Dataset]
) -> NamedTuple("ValidateOutputs", [("effects", list), ("rollout_params", str), ("bank_digest", str)]):
    """Check the imported bank (schemas, images, LoRA files, no pickle) and the params; list the effects
    to roll out, and what the rollouts' cache key needs: the params sections they read, the bank's content."""
    from collections import namedtuple
    from pathlib import Path

    from collectionlora.pipeline.task_params import ROLLOUT_SECTIONS, bank_digest, sections_json, shipped_effects, task_params
    from collectionlora.stages import run_validate

    task = task_params(params, bank.path)
    validated = run_validate(task.bank, Path(manifest.path), None, data_version or None)
    outputs = namedtuple("ValidateOutputs", ["effects", "rollout_params", "bank_digest"])
    return outputs(shipped_effects(task), sections_json(params, ROLLOUT_SECTIONS), bank_digest(validated))
