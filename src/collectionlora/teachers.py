"""Train one effect LoRA from (source, result) pairs and a prompt, by flow matching.

Users often bring ~20 example pairs rather than a LoRA; this turns them into a teacher. It is also
how the demo bank's teachers are made. The output is a stock diffusers LoRA file
(`pytorch_lora_weights.safetensors`, loadable with `pipe.load_lora_weights`) and its PEFT
`adapter_config.json`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import QwenImageEditPlusPipeline

from collectionlora.adapters import AdapterSet
from collectionlora.config import LoraConfig, SamplingConfig
from collectionlora.flowmatch import fit, pair_batches
from collectionlora.lorafile import ordinary_permissions
from collectionlora.models.backbone import DTYPES, Backbone

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINING_ADAPTER = "teacher_in_training"


def train_teacher(
    backbone: Backbone,
    adapters: AdapterSet,
    sources: torch.Tensor,
    results: torch.Tensor,
    prompt: str,
    lora: LoraConfig,
    sampling: SamplingConfig,
    description: str = "teacher",
) -> tuple[dict[str, torch.Tensor], dict, list[float]]:
    """Fit a fresh LoRA on the pairs; returns (diffusers-key weights, PEFT config dict, losses).

    The adapter is removed from the base afterwards, so many teachers can be trained in one process.
    """
    if sources.shape != results.shape or sources.shape[0] == 0:
        raise ValueError(f"{description}: need matching, non-empty sources and results, got {tuple(sources.shape)} and {tuple(results.shape)}")
    parameters = adapters.add_trainable(TRAINING_ADAPTER, lora.rank, lora.alpha, lora.targets, lora.seed)
    try:
        adapters.activate(TRAINING_ADAPTER)
        batches = pair_batches(
            backbone, sources, results, [prompt] * len(sources), lora.batch_size, lora.prompt_dropout, sampling.negative_prompt
        )
        losses = fit(backbone, parameters, batches, lora.steps, lora.lr, lora.seed, description)
        weights = adapters.lora_state_dict(TRAINING_ADAPTER)
        config = adapters.peft_config(TRAINING_ADAPTER)
    finally:
        adapters.remove(TRAINING_ADAPTER)
    return weights, config, losses


def save_teacher(weights: dict[str, torch.Tensor], peft_config: dict, out_dir: Path, save_dtype: str) -> Path:
    """Write the LoRA in diffusers layout plus adapter_config.json, atomically (temp dir, then rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    dtype = DTYPES[save_dtype]
    QwenImageEditPlusPipeline.save_lora_weights(
        staging,
        transformer_lora_layers={k: v.to(dtype) for k, v in weights.items()},
        weight_name=LORA_WEIGHTS,
    )
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_config.items()}
    (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True, default=str), encoding="utf-8")
    ordinary_permissions(staging)
    if out_dir.exists():
        for stale in out_dir.iterdir():
            stale.unlink()
        out_dir.rmdir()
    os.replace(staging, out_dir)
    return out_dir / LORA_WEIGHTS
