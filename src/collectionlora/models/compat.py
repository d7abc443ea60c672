"""The two workarounds the embedded tiny Qwen-Image-Edit pipeline needs on a CPU box without torchvision.

1. transformers 5 cannot construct `Qwen2VLProcessor` without torchvision (its `__init__` type-checks
   the video-processor slot against a class only exported with torchvision; transformers #48558).
   We build the real class around its PIL image processor without calling that `__init__`.
2. The Qwen edit pipelines resize the condition image to about 1024^2 (VAE) and 384^2 (text encoder)
   whatever the output size, which makes a 32x32 edit take 39 s instead of 0.08 s. `condition_area`
   swaps those module globals for the duration of a call.

Both apply only where needed: real models on a GPU install (with torchvision) use neither.
`load_pipeline` is the one call a plain diffusers script needs to load a saved base with them.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from transformers import Qwen2Tokenizer, Qwen2VLProcessor
from transformers.utils import is_torchvision_available

import collectionlora.models.pixel_vae  # noqa: F401  (diffusers loads the embedded VAE class only once it is imported)

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


def processor_override(pipeline_dir: Path) -> dict:
    """`{"processor": rebuilt}` where stock loading of the saved processor would fail, else `{}`: without
    torchvision, or when the folder has no video-processor config (the embedded base saves none)."""
    stock_loadable = (Path(pipeline_dir) / "processor" / "video_preprocessor_config.json").is_file()
    return {"processor": load_processor(pipeline_dir)} if processor_needs_workaround() or not stock_loadable else {}


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """The stock diffusers pipeline saved at `path` (the embedded base, e.g. `data/base`), loadable here.

    `DiffusionPipeline.from_pretrained(path)` with the pixel-shuffle VAE class imported and, where needed,
    the processor rebuilt. Call the embedded base inside `condition_area(resolution**2)`. A real
    Qwen-Image-Edit base with torchvision installed needs none of this: plain `from_pretrained` works.
    """
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path}: no model_index.json (not a saved diffusers pipeline)")
    return DiffusionPipeline.from_pretrained(path, dtype=dtype, **processor_override(path))


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
