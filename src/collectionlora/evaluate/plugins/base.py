"""The plugin interface: what a real-model image metric looks like, and the errors plugins raise."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from collectionlora.errors import CollectionLoraError

MESSAGE_LIMIT = 300  # characters of a third-party error message kept in ours


class MetricPluginError(CollectionLoraError):
    """A real-model metric cannot run: missing or unusable weights, or an unusable judge endpoint."""


class MllmJudgeError(MetricPluginError):
    """The MLLM judge endpoint failed or gave a reply that does not follow the asked JSON schema."""


@runtime_checkable
class ImageSimilarity(Protocol):
    """A score per image pair: `metric(images, references)` on [B, 3, H, W] floats in [0, 1] gives Tensor[B]."""

    name: str

    def __call__(self, images: Tensor, references: Tensor) -> Tensor: ...


def one_line(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """`text` on one line, cut to `limit` characters: third-party messages inside ours stay short."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
