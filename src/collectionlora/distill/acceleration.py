"""An acceleration LoRA for a base: the distillation engine on the general stream alone.

The paper's "Base + Lightning" baseline stacks an effect LoRA with a few-step LoRA of the base
(lightx2v's Qwen-Image-Edit Lightning). A real base has one to download; the embedded tiny base has
none, so the demo bank ships one made here: BS-DMD against the frozen base on the general images and
instructions (PDSR with p_switch 0, no TS, no TA-FM), with the student sampler's step list. It knows
no effect, which is the point: cascading it with a teacher is the cascade users run today.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from collectionlora.adapters import AdapterSet
from collectionlora.config import DistillConfig, Params
from collectionlora.distill.data import DistillData, EffectSchedule
from collectionlora.distill.export import LORA_WEIGHTS, export_student
from collectionlora.distill.parallel import World
from collectionlora.distill.trainer import CRITIC, STUDENT, Distiller
from collectionlora.errors import CollectionLoraError
from collectionlora.models.backbone import Backbone
from collectionlora.sampling import student_timesteps


def acceleration_config(params: Params) -> DistillConfig:
    """The distill settings the acceleration LoRA trains with: the student's, restricted to the general
    stream. The demo bank keys its cache on this, so a change to a value overridden here (the student's
    budget, its streams) does not retrain it."""
    return params.distill.model_copy(
        update={
            "pdsr": True,
            "p_switch": 0.0,
            "ts": False,
            "ta_fm": False,
            "anchor_steps": 0,
            "lr_schedule": "constant",
            "effects_per_batch": 1,
            "max_steps": params.acceleration.max_steps,
            "seed": params.acceleration.seed,
        }
    )


def train_acceleration(
    params: Params, backbone: Backbone, general_sources: torch.Tensor, instructions: Sequence[str], out: Path
) -> Path:
    """Distil the base's own few-step ability into a LoRA; writes out/pytorch_lora_weights.safetensors."""
    config = acceleration_config(params)
    adapters = AdapterSet(backbone.transformer)
    adapters.add_trainable(STUDENT, config.rank, config.alpha, config.targets, config.seed)
    adapters.add_trainable(CRITIC, config.rank, config.alpha, config.targets, config.seed + 1)
    data = DistillData(backbone, {}, general_sources, instructions, params.sampling.negative_prompt)
    schedule = EffectSchedule([], [], 0.0, config.seed)
    distiller = Distiller(
        backbone, adapters, config, params.sampling, student_timesteps(params.sampling), data, schedule, World(0, 1, 0), config.max_steps
    )
    skipped = 0
    for _ in tqdm(range(config.max_steps), desc="acceleration", mininterval=2.0):
        skipped += distiller.step().skipped
    if not distiller.parameters_finite():
        raise CollectionLoraError(f"acceleration: non-finite weights after {config.max_steps} steps ({skipped} skipped); lower distill.lr")
    weights = adapters.lora_state_dict(STUDENT)
    adapters.remove(STUDENT)
    adapters.remove(CRITIC)
    export_student(weights, config.alpha, Path(out), params.distill.save_dtype, kohya=False)
    return Path(out) / LORA_WEIGHTS

