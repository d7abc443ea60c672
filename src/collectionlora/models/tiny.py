"""Build the embedded default: a real `QwenImageEditPlusPipeline` with tiny weights, fully offline.

Components: a ~2.5M-parameter `QwenImageTransformer2DModel`, a tiny random frozen Qwen2.5-VL text
encoder with a byte-level BPE tokenizer fitted offline on the prompt template and effect
instructions, the weight-free pixel-shuffle VAE, and the stock flow-matching Euler scheduler.
Findings behind every number: ../shared/notes/embedded-model.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
)

from collectionlora.config import TinyArchitecture
from collectionlora.models.compat import build_processor
from collectionlora.models.pixel_vae import PixelShuffleVAE

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


# Editing vocabulary the tokenizer is fitted on besides the caller's corpus. Any text still encodes
# (byte-level BPE); this only keeps common instruction words to a few tokens each.
EDITING_VOCABULARY = [
    "Turn the photo into a black and white picture with soft grain",
    "Make the colours warmer, cooler, brighter, darker, more vivid or muted",
    "Add a border, a frame, stripes, dots, sparkles, snow, rain, fog or bubbles to the image",
    "Blur the background, sharpen the subject, pixelate the picture into blocks",
    "Give the picture a red, green, blue, yellow, orange, purple, pink, cyan or magenta tint",
    "Apply a vintage film look with a vignette, light leaks and scratches",
    "Keep the subject and the composition, change only the style of the image",
    "Place a sticker, a badge or a heart in the corner of the photo",
    "Swap the colours, invert the tones, lift the shadows and soften the highlights",
]


def fit_tokenizer(corpus: Iterable[str], vocab_size: int) -> Qwen2Tokenizer:
    """Fit a byte-level BPE offline and wrap it in the real Qwen2Tokenizer class.

    Fitting on the pipeline's own prompt template keeps its system prefix near the 64 tokens the
    pipeline drops (`prompt_template_encode_start_idx`); a plain byte vocabulary would make it ~300.
    Byte-level BPE still encodes any text (triggers, captions) through its byte alphabet.
    """
    prefix = (
        "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
        "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
        "image that meets the user's requirements while maintaining consistency with the original input where "
        "appropriate.<|im_end|>\n<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
    )
    lines = [prefix] * 50 + EDITING_VOCABULARY + list(corpus) + ["<|im_end|>\n<|im_start|>assistant\n"] * 50
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(lines, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    return tokenizer


def build_text_encoder(tokenizer: Qwen2Tokenizer, arch: TinyArchitecture) -> Qwen2_5_VLForConditionalGeneration:
    """A random, frozen Qwen2.5-VL: distinct instructions still give distinct embeddings."""
    ids = tokenizer.convert_tokens_to_ids
    hidden, heads = arch.text_hidden_size, arch.text_heads
    half_head = hidden // heads // 2
    mrope = [half_head // 4, half_head // 4, half_head - 2 * (half_head // 4)]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": arch.text_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 1,
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_heads": heads,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [0],
            "window_size": 56,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.requires_grad_(False)
    return model


def build_transformer(arch: TinyArchitecture) -> QwenImageTransformer2DModel:
    channels = 3 * arch.vae_factor**2
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=channels * 4,
        out_channels=channels,
        num_layers=arch.num_layers,
        attention_head_dim=arch.attention_head_dim,
        num_attention_heads=arch.num_attention_heads,
        joint_attention_dim=arch.text_hidden_size,
        axes_dims_rope=tuple(arch.axes_dims_rope),
    )


def build_tiny_pipeline(arch: TinyArchitecture, corpus: Iterable[str], seed: int) -> QwenImageEditPlusPipeline:
    """The embedded pipeline with freshly initialised weights, deterministic given `seed`."""
    if arch.joint_attention_dim != arch.text_hidden_size:
        raise ValueError(
            f"base.tiny.joint_attention_dim ({arch.joint_attention_dim}) must equal text_hidden_size "
            f"({arch.text_hidden_size}): the transformer reads the text encoder's hidden states"
        )
    torch.manual_seed(seed)
    tokenizer = fit_tokenizer(corpus, arch.vocab_size)
    text_encoder = build_text_encoder(tokenizer, arch)
    transformer = build_transformer(arch)
    processor = build_processor(tokenizer, Qwen2VLImageProcessorPil())
    return QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=PixelShuffleVAE.for_factor(arch.vae_factor),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )
