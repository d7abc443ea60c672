"""CLIP and DINO image-image cosine similarity from local transformers checkpoints (docs/method.md 8.2).

CLIP compares a result with a reference result of the same effect ("style alignment"); DINO compares a source
with its result ("subject consistency"). The pairing is the caller's; here a metric scores pairs. Folders are
read with `local_files_only=True`, so nothing is downloaded. Preprocessing is the checkpoint's own image
processor on its PIL backend (torchvision is not installed), fed 8-bit RGB images, as the models were trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Model,
    Dinov2WithRegistersModel,
    PretrainedConfig,
    ViTModel,
)

from collectionlora.evaluate.plugins.base import MetricPluginError, one_line
from collectionlora.images import to_pil

RANGE_SLACK = 1e-3  # images may overshoot [0, 1] by this much (float rounding) before they count as wrong

Features = Callable[[nn.Module, Tensor], Tensor]


def _clip_features(model: nn.Module, pixels: Tensor) -> Tensor:
    """CLIP's projected image embedding, the one its image-text and image-image scores use."""
    return model(pixel_values=pixels).image_embeds


def _cls_features(model: nn.Module, pixels: Tensor) -> Tensor:
    """The final-layer-normed CLS token: DINO's image descriptor (equal to Dinov2Model's pooler_output)."""
    return model(pixel_values=pixels).last_hidden_state[:, 0]


@dataclass(frozen=True)
class _Family:
    """Which checkpoint types a metric accepts, how each loads, and which features it compares."""

    metric: str
    classes: dict[str, tuple[type, Callable[[PretrainedConfig], dict]]]  # model_type -> (class, from_pretrained kwargs)
    features: Features


def _as_saved(config: PretrainedConfig) -> dict:
    return {}


def _vision_half(config: PretrainedConfig) -> dict:
    """A full CLIP checkpoint's vision config, with the projection size of the whole model.

    CLIPVisionModelWithProjection reads only `vision_config`, whose projection_dim may be absent (default 512)
    when the checkpoint keeps it at the top level.
    """
    vision = CLIPVisionConfig.from_dict(config.vision_config.to_dict())
    vision.projection_dim = config.projection_dim
    return {"config": vision}


CLIP = _Family(
    "clip",
    {"clip": (CLIPVisionModelWithProjection, _vision_half), "clip_vision_model": (CLIPVisionModelWithProjection, _as_saved)},
    _clip_features,
)
DINO = _Family(
    "dino",
    {
        "dinov2": (Dinov2Model, _as_saved),
        "dinov2_with_registers": (Dinov2WithRegistersModel, _as_saved),
        # DINO v1 (facebook/dino-vit*) ships no pooler: build none rather than a random one
        "vit": (ViTModel, lambda config: {"add_pooling_layer": False}),
    },
    _cls_features,
)


class FeatureSimilarity:
    """Cosine similarity of one vision model's image features; an `ImageSimilarity` (score(a, a) == 1)."""

    def __init__(
        self, name: str, path: Path, model: nn.Module, processor, features: Features, device: torch.device, batch_size: int
    ) -> None:
        self.name, self.path = name, path
        self.model, self.processor, self.features = model, processor, features
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Unit-norm float32 features [B, D] on the CPU of [B, 3, H, W] images in [0, 1]."""
        _check_batch(self.name, "images", images)
        rows = []
        for start in range(0, images.shape[0], self.batch_size):
            pictures = [to_pil(image) for image in images[start : start + self.batch_size]]
            pixels = self.processor(images=pictures, return_tensors="pt")["pixel_values"]
            rows.append(self.features(self.model, pixels.to(self.device, torch.float32)).float().cpu())
        return F.normalize(torch.cat(rows), dim=-1)

    def __call__(self, images: Tensor, references: Tensor) -> Tensor:
        """Per-pair cosine similarity [B] in [-1, 1]; symmetric in its arguments."""
        _check_batch(self.name, "references", references)
        if images.shape[0] != references.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {references.shape[0]} references")
        return (self.embed(images) * self.embed(references)).sum(dim=-1).clamp(-1.0, 1.0)


def load_clip(path: Path | str, device: str, batch_size: int) -> FeatureSimilarity:
    """CLIP image-image similarity from a local CLIP (or CLIP vision-with-projection) checkpoint folder."""
    return _load(CLIP, Path(path), device, batch_size)


def load_dino(path: Path | str, device: str, batch_size: int) -> FeatureSimilarity:
    """DINO similarity (CLS features) from a local DINOv2 or DINO ViT checkpoint folder."""
    return _load(DINO, Path(path), device, batch_size)


def _load(family: _Family, path: Path, device: str, batch_size: int) -> FeatureSimilarity:
    what = f"{path}: {family.metric} model folder"
    if not path.is_dir():
        raise MetricPluginError(f"{what} not found (set eval_plugins.{family.metric}.path to a local checkpoint folder)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise MetricPluginError(f"{what} is not a transformers model (config.json: {one_line(error)})") from error
    if config.model_type not in family.classes:
        raise MetricPluginError(f"{what} holds a '{config.model_type}' model; expected one of {sorted(family.classes)}")
    model_class, model_kwargs = family.classes[config.model_type]
    try:
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
    except (OSError, ValueError, KeyError) as error:
        raise MetricPluginError(f"{what} has no usable preprocessor_config.json ({one_line(error)})") from error
    try:
        model, info = model_class.from_pretrained(
            path, local_files_only=True, output_loading_info=True, dtype=torch.float32, **model_kwargs(config)
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise MetricPluginError(f"{what}: cannot load the weights ({one_line(error)})") from error
    # transformers fills absent tensors with random values and only warns: a metric on those is noise
    for key, problem in (("missing_keys", "lacks"), ("mismatched_keys", "has wrongly shaped")):
        bad = sorted(str(k) for k in info[key])
        if bad:
            raise MetricPluginError(f"{what} {problem} {len(bad)} tensors {model_class.__name__} needs, e.g. {bad[0]}")
    target = torch.device(device)
    return FeatureSimilarity(family.metric, path, model.to(target).eval(), processor, family.features, target, batch_size)


def _check_batch(metric: str, name: str, images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{metric}: expected {name} as [B, 3, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{metric}: {name} is an empty batch")
    if not torch.isfinite(images).all() or images.min() < -RANGE_SLACK or images.max() > 1 + RANGE_SLACK:
        raise ValueError(f"{metric}: {name} must be finite and in [0, 1]")
