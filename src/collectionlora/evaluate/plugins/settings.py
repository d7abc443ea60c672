"""The `eval_plugins` section of params.yaml: real-model metrics, each off until it is given weights or an endpoint.

These classes are meant to move into collectionlora/config.py unchanged (with `eval_plugins: EvalPluginsConfig`
added to `Params`); until then they live here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from collectionlora.config import Section


class SimilarityModelConfig(Section):
    """A local transformers checkpoint folder (config.json, weights, preprocessor_config.json); never downloaded."""

    enabled: bool
    path: Path | None

    @model_validator(mode="after")
    def _enabled_needs_a_path(self) -> SimilarityModelConfig:
        if self.enabled and self.path is None:
            raise ValueError("enabled: true needs path (a local model folder)")
        return self


class MllmJudgeConfig(Section):
    """An OpenAI-compatible chat endpoint judging BCR and VSA (the paper: Qwen-VL-Max-Latest)."""

    enabled: bool
    url: str | None  # base URL; the judge POSTs {url}/chat/completions
    model: str | None
    api_key_env: str | None  # environment variable holding the key; null = no Authorization header
    timeout_s: float = Field(gt=0)

    @model_validator(mode="after")
    def _enabled_needs_an_endpoint(self) -> MllmJudgeConfig:
        if self.enabled and (self.url is None or self.model is None):
            raise ValueError("enabled: true needs url and model")
        return self


class EvalPluginsConfig(Section):
    """Real-model metrics of METHOD.md 8.2: CLIP and DINO image similarity, and the BCR/VSA MLLM judge."""

    device: str  # where the CLIP and DINO models run: cpu | cuda | cuda:N
    batch_size: int = Field(ge=1)  # images per CLIP or DINO forward
    clip: SimilarityModelConfig
    dino: SimilarityModelConfig
    mllm: MllmJudgeConfig
