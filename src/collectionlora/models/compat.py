"""The two workarounds the embedded tiny Qwen-Image-Edit pipeline needs on a CPU box without torchvision.

1. transformers 5 cannot construct `Qwen2VLProcessor` without torchvision (its `__init__` type-checks
   the video-processor slot against a class only exported with torchvision; transformers #48558).
   We build the real class around its PIL image processor without calling that `__init__`.
2. The Qwen edit pipelines resize the condition image to about 1024^2 (VAE) and 384^2 (text encoder)
   whatever the output size, which makes a 32x32 edit take 39 s instead of 0.08 s. `condition_area`
   swaps those module globals for the duration of a call.

Both apply only where needed: real models on a GPU install (with torchvision) use neither.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path

from transformers import Qwen2Tokenizer, Qwen2VLProcessor
from transformers.utils import is_torchvision_available

_PIPELINE_MODULES = (
    "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit",
    "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus",
)


def processor_needs_workaround() -> bool:
    return not is_torchvision_available()


def build_processor(tokenizer: Qwen2Tokenizer, image_processor) -> Qwen2VLProcessor:
    """A real `Qwen2VLProcessor` with no video processor, constructed without torchvision."""
    processor = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    processor.image_processor = image_processor
    processor.tokenizer = tokenizer
    processor.video_processor = None
    processor.chat_template = None
    processor.image_token = "<|image_pad|>"
    processor.video_token = "<|video_pad|>"
    processor.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    processor.video_token_id = tokenizer.convert_tokens_to_ids(processor.video_token)
    # Shadow the classmethod so save_pretrained does not look for the missing video processor.
    processor.get_attributes = lambda: ["image_processor", "tokenizer"]
    return processor


def load_processor(pipeline_dir: Path) -> Qwen2VLProcessor:
    """Rebuild a saved pipeline's processor from its tokenizer/ and processor/ folders, offline."""
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = Qwen2Tokenizer.from_pretrained(pipeline_dir / "tokenizer")
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(pipeline_dir / "processor")
    return build_processor(tokenizer, image_processor)


@contextlib.contextmanager
def condition_area(pixels: int) -> Iterator[None]:
    """Make the Qwen edit pipelines size condition images to `pixels` area instead of 1024^2 / 384^2."""
    modules = [importlib.import_module(name) for name in _PIPELINE_MODULES]
    saved = []
    for module in modules:
        original = module.calculate_dimensions
        saved.append((module, original, getattr(module, "VAE_IMAGE_SIZE", None), getattr(module, "CONDITION_IMAGE_SIZE", None)))
        module.calculate_dimensions = lambda _area, ratio, _f=original: _f(pixels, ratio)
        if hasattr(module, "VAE_IMAGE_SIZE"):
            module.VAE_IMAGE_SIZE = pixels
            module.CONDITION_IMAGE_SIZE = pixels
    try:
        yield
    finally:
        for module, original, vae_size, condition_size in saved:
            module.calculate_dimensions = original
            if vae_size is not None:
                module.VAE_IMAGE_SIZE = vae_size
                module.CONDITION_IMAGE_SIZE = condition_size
