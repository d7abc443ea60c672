"""Tiny random CLIP / DINO checkpoints saved the way hub snapshots are laid out (config, weights,
preprocessor_config.json), for the real-model metric plugins."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
)

TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY = {**TINY_TOWER, "image_size": 32, "patch_size": 8}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def processor_config(kind: str, mean: list[float], std: list[float]) -> dict:
    """A preprocessor_config.json like the hub's (resize shortest edge, centre crop, rescale, normalise)."""
    return {
        "image_processor_type": kind,
        "do_resize": True,
        "size": {"shortest_edge": 32},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": mean,
        "image_std": std,
        "do_convert_rgb": True,
    }


def save_checkpoint(model: torch.nn.Module, folder: Path, processor: dict | None) -> Path:
    model.save_pretrained(folder)
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor), encoding="utf-8")
    return folder


def tiny_clip(folder: Path) -> Path:
    """A CLIP vision tower with its projection (what the CLIP plugin loads)."""
    torch.manual_seed(0)
    config = CLIPVisionConfig(**TINY, projection_dim=16)
    return save_checkpoint(CLIPVisionModelWithProjection(config), folder, processor_config("CLIPImageProcessor", CLIP_MEAN, CLIP_STD))


def tiny_dinov2(folder: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(Dinov2Model(Dinov2Config(**TINY)), folder, processor_config("BitImageProcessor", IMAGENET_MEAN, IMAGENET_STD))
