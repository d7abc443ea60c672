"""Real-model metrics of docs/method.md 8.2 behind one interface, each off until params.yaml enables it.

`ImageSimilarity` metrics (CLIP, DINO) score image pairs from local checkpoint folders; `MllmJudge` asks an
OpenAI-compatible endpoint the paper's BCR and VSA prompts. `load_plugins(config)` builds the enabled ones;
a disabled metric is None, and an enabled one that cannot load is an error, never silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

from collectionlora.config import (
    EvalPluginsConfig,
    MllmJudgeConfig,
    SimilarityModelConfig,
)
from collectionlora.evaluate.plugins.base import (
    ImageSimilarity,
    MetricPluginError,
    MllmJudgeError,
)
from collectionlora.evaluate.plugins.mllm_judge import (
    CaseVerdict,
    JudgeCase,
    MllmJudge,
    summarize,
)
from collectionlora.evaluate.plugins.similarity import (
    FeatureSimilarity,
    load_clip,
    load_dino,
)

__all__ = [
    "CaseVerdict",
    "EvalPlugins",
    "EvalPluginsConfig",
    "FeatureSimilarity",
    "ImageSimilarity",
    "JudgeCase",
    "MetricPluginError",
    "MllmJudge",
    "MllmJudgeConfig",
    "MllmJudgeError",
    "SimilarityModelConfig",
    "load_clip",
    "load_dino",
    "load_plugins",
    "summarize",
]


@dataclass(frozen=True)
class EvalPlugins:
    """The enabled real-model metrics; None where params.yaml leaves one off."""

    clip: ImageSimilarity | None
    dino: ImageSimilarity | None
    judge: MllmJudge | None

    @property
    def enabled(self) -> list[str]:
        return [name for name in ("clip", "dino", "judge") if getattr(self, name) is not None]


def load_plugins(config: EvalPluginsConfig) -> EvalPlugins:
    """Load the metrics `config` enables (models from local folders, the judge's API key from the environment)."""
    clip = load_clip(config.clip.path, config.device, config.batch_size) if config.clip.enabled else None
    dino = load_dino(config.dino.path, config.device, config.batch_size) if config.dino.enabled else None
    judge = MllmJudge(config.mllm) if config.mllm.enabled else None
    return EvalPlugins(clip, dino, judge)
